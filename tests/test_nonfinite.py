"""NaN/inf weights are refused on load and by `mixq info --check`; a wrong shape in the last layer is named before
anything loads; non-finite logits end only the request that produced them (finish_reason "error")."""

import random

import pytest
import torch
from conftest import TINY_MIXTRAL
from safetensors.torch import load_file, save_file

import mixq
from mixq.cli.main import main
from mixq.engine.generate import Engine, Request
from mixq.engine.sampling import SamplingParams
from mixq.errors import CheckpointError, MixqError
from mixq.model.config import MixtralConfig
from mixq.model.finite import count_nonfinite
from mixq.synthetic.exl2_checkpoint import write_synthetic
from mixq.synthetic.hf_checkpoint import write_random_checkpoint

CFG = dict(TINY_MIXTRAL, max_position_embeddings=128)


def _float_ckpt(path, dtype):
    write_random_checkpoint(str(path), MixtralConfig(**CFG), seed=random.randrange(10**6), dtype=dtype, shard_layers=1)
    return path


def _exl2_ckpt(path):
    write_synthetic(str(path), MixtralConfig(**CFG), 4.0, seed=random.randrange(10**6), log=lambda *_: None)
    src = path.parent / "tok"  # the synthetic EXL2 writer has no tokenizer; borrow a random float model's
    write_random_checkpoint(str(src), MixtralConfig(**CFG), seed=0)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            (path / f.name).write_bytes(f.read_bytes())
    return path


def _poison(path, pick, values=(float("nan"), float("inf"), float("-inf"))):
    """Write 1..5 non-finite values into a random float tensor chosen by `pick(key)`; returns (key, count)."""
    shards = sorted(path.glob("*.safetensors"))
    candidates = [(s, k) for s in shards for k, v in load_file(str(s)).items() if v.is_floating_point() and pick(k)]
    shard, key = random.choice(candidates)
    sd = load_file(str(shard))
    flat = sd[key].view(-1)
    n = random.randint(1, min(5, flat.numel()))
    for i in random.sample(range(flat.numel()), n):
        flat[i] = random.choice(values)
    save_file(sd, str(shard), metadata={"format": "pt"})
    return key, n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_nonfinite_float_weights_are_refused_on_load(tmp_path, dtype):
    path = _float_ckpt(tmp_path / "m", dtype)
    key, n = _poison(path, lambda k: True)
    with pytest.raises(CheckpointError) as info:
        mixq.load_model(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{key}: {n} of ") and "NaN or inf" in msg and "\n" not in msg


@pytest.mark.parametrize("where", ["float", "q_scale_max"])
def test_nonfinite_exl2_checkpoint_is_refused_on_load(tmp_path, where):
    path = _exl2_ckpt(tmp_path / "q")
    pick = (lambda k: k.endswith(".q_scale_max")) if where == "q_scale_max" else (lambda k: ".q_" not in k)
    key, n = _poison(path, pick)
    with pytest.raises(MixqError) as info:
        mixq.load_model(str(path))
    assert str(info.value).startswith(f"{key}: {n} of ") and "NaN or inf" in str(info.value)


def test_info_check_reports_nonfinite_values(tmp_path, capsys):
    path = _float_ckpt(tmp_path / "m", torch.bfloat16)
    assert main(["info", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "hold no NaN or inf" in out
    key, n = _poison(path, lambda k: "layers.1." in k)
    assert main(["info", str(path)]) == 0  # without --check only the headers are read
    capsys.readouterr()
    assert main(["info", str(path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{key}: {n} of " in err and err.count("\n") == 1


def test_info_check_validates_exl2_sets(tmp_path, capsys):
    path = _exl2_ckpt(tmp_path / "q")
    assert main(["info", str(path), "--check"]) == 0
    assert "EXL2 tensor sets are valid" in capsys.readouterr().out
    shard = sorted(path.glob("*.safetensors"))[-1]
    sd = load_file(str(shard))
    key = random.choice([k for k in sd if k.endswith(".q_invperm")])
    sd[key][0] = sd[key][1]  # a duplicate: no longer a permutation
    save_file(sd, str(shard), metadata={"format": "pt"})
    assert main(["info", str(path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{key}: is not a permutation" in err and err.count("\n") == 1


def test_wrong_shape_in_last_layer_is_named_by_info_and_before_loading(tmp_path, capsys, monkeypatch):
    path = _float_ckpt(tmp_path / "m", torch.float16)
    shard = sorted(path.glob("*-00002-*.safetensors"))[0]  # layer 1 of 2
    sd = load_file(str(shard))
    key = random.choice([k for k in sd if k.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))])
    sd[key] = sd[key][:, :32].contiguous()
    save_file(sd, str(shard), metadata={"format": "pt"})
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert key in err and "disagrees with config.json" in err and err.count("\n") == 1
    built = []
    monkeypatch.setattr("mixq.model.loader._Builder.layer", lambda self, i: built.append(i))
    with pytest.raises(CheckpointError, match="disagrees with config.json"):
        mixq.load_model(str(path))
    assert built == []  # refused before layer 0 was built


def test_count_nonfinite_counts_exactly():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = torch.randn(3000, 7).to(dtype)
        n = random.randint(0, 50)
        idx = torch.randperm(t.numel())[:n]
        t.view(-1)[idx] = torch.tensor(
            [random.choice([float("nan"), float("inf"), -float("inf")]) for _ in range(n)], dtype=dtype
        )
        assert count_nonfinite(t) == n
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # finite, but the fp16 sum overflows
    assert count_nonfinite(big) == 0


def _nan_after_layer(model, layer: int, active: list[bool]):
    def hook(module, args, output):
        return output * float("nan") if active else output

    return model.model.layers[layer].register_forward_hook(hook)


def test_nonfinite_logits_end_that_request_only(tmp_path):
    path = _float_ckpt(tmp_path / "m", torch.float32)
    model, tok = mixq.load_model(str(path)), mixq.load_tokenizer(str(path))
    engine = Engine(model, tok, max_batch=2, page_size=16, cache_tokens=256)
    free = engine.pool.free_pages
    active = [True]
    handle = _nan_after_layer(model, random.randrange(CFG["num_hidden_layers"]), active)
    sampling = SamplingParams(temperature=0.8, seed=random.randrange(1000))
    rid = engine.add(Request(tok.encode("Hello there"), max_new_tokens=8, sampling=sampling))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")]
    assert "NaN or inf logits" in outs[0].error and engine.pool.free_pages == free and not engine.has_work()
    active.clear()
    rid2 = engine.add(Request(tok.encode("Hello there"), max_new_tokens=4, sampling=sampling, eos_ids=[]))
    res = engine.results()
    assert len(res[rid2]) == 4
    handle.remove()


def test_cli_prints_one_line_and_exits_nonzero_on_nonfinite_logits(tmp_path, capsys, monkeypatch):
    path = _float_ckpt(tmp_path / "m", torch.float32)
    load = mixq.load_model

    def poisoned(*a, **kw):
        model = load(*a, **kw)
        _nan_after_layer(model, random.randrange(CFG["num_hidden_layers"]), [True])
        return model

    monkeypatch.setattr(mixq, "load_model", poisoned)
    assert main(["generate", str(path), "--prompt", "Hello", "--device", "cpu", "--max-new-tokens", "4"]) == 1
    err = capsys.readouterr().err
    assert "NaN or inf logits" in err and err.count("\n") == 1 and "Traceback" not in err
