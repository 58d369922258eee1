"""`mixq convert` end to end on tiny random Mixtrals (CPU)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mixq
from mixq.convert.optimize import Option, anneal, solve, total
from mixq.convert.pipeline import ConvertOptions, convert
from mixq.errors import MixqError
from mixq.exl2.format import parse_exl2

TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)


def _tokenizer_files(path):
    from mixq.synthetic.hf_checkpoint import SAMPLE_TEXT, build_tokenizer, save_tokenizer

    save_tokenizer(str(path), build_tokenizer([SAMPLE_TEXT] * 4, 512), 512)


def _calibration(tmp_path, words=9000):
    import random

    rng = random.Random(0)
    vocab = "the of and to a in that it was her his she he you not be with as had for at on my".split()
    text = " ".join(rng.choice(vocab) + ("." if rng.random() < 0.1 else "") for _ in range(words))
    p = tmp_path / "cal.txt"
    p.write_text(text)
    return str(p)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    from conftest import make_hf_mixtral

    path = tmp_path_factory.mktemp("src") / "hf"
    make_hf_mixtral(path, seed=1234, **TINY)
    _tokenizer_files(path)
    return path


def _opts(cal, **kw):
    return ConvertOptions(calibration=[cal], rows=6, measure_rows=4, length=128, device="cpu", **kw)


@pytest.fixture(scope="module")
def converted(tiny_src, tmp_path_factory):
    """The tiny model at 4.0 bpw (measured), then 2.5 and 6.0 reusing its measurement."""
    tmp = tmp_path_factory.mktemp("conv")
    cal = _calibration(tmp)
    outs = {4.0: str(tmp / "b4")}
    convert(str(tiny_src), outs[4.0], _opts(cal, bits=4.0), log=lambda *_: None)
    for b in (2.5, 6.0):
        outs[b] = str(tmp / f"b{b}")
        convert(
            str(tiny_src),
            outs[b],
            _opts(cal, bits=b, measurement=os.path.join(outs[4.0], "measurement.json")),
            log=lambda *_: None,
        )
    return outs, cal


def test_outputs_are_valid_exl2_within_budget_and_improve_with_bits(tiny_src, converted):
    outs, _ = converted
    ref = mixq.load_model(str(tiny_src), dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 48))
    expected = ref(ids)
    errors = []
    for bits, out in sorted(outs.items()):
        summary = json.loads(open(os.path.join(out, "mixq_convert.json")).read())
        assert bits - 0.1 <= summary["bpw"] <= bits + 0.02, (bits, summary["bpw"])
        tensors = {}
        for f in os.listdir(out):
            if f.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(out, f)))
        prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".q_weight")})
        assert len(prefixes) == TINY["num_hidden_layers"] * (4 + 3 * TINY["num_local_experts"]) + 1
        for p in prefixes:
            parse_exl2({k[len(p) + 1 :]: v for k, v in tensors.items() if k.startswith(p + ".")}, p)
        cfg = json.loads(open(os.path.join(out, "config.json")).read())
        assert cfg["quantization_config"]["quant_method"] == "exl2" and cfg["quantization_config"]["bits"] == bits
        model = mixq.load_model(out, dtype=torch.float32)
        assert model.exl2_linears == len(prefixes)
        errors.append(((model(ids) - expected).norm() / expected.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors


def test_info_shows_the_per_layer_table(converted, capsys):
    outs, _ = converted
    from mixq.cli.main import main

    assert main(["info", outs[4.0]]) == 0
    text = capsys.readouterr().out
    assert "exl2" in text and "moe err" in text and "target 4.0 bpw" in text


def test_killed_conversion_resumes_to_the_same_result(tiny_src, converted, tmp_path):
    outs, cal = converted
    out = str(tmp_path / "resumed")
    code = (  # one thread, as the in-process reference ran (conftest): float sums depend on the split
        "import torch; torch.set_num_threads(1); "
        f"from mixq.convert.pipeline import *; convert({str(tiny_src)!r}, {out!r}, ConvertOptions(bits=4.0, "
        f"calibration=[{cal!r}], rows=6, measure_rows=4, length=128, device='cpu'))"
    )
    # After a layer, and between saving its output and recording it as done (a resume must not feed layer i its
    # own output): each pass is killed at both.
    for stage in ("measure:0", "measure-saved:1", "quant-saved:0", "quant:0"):
        env = dict(os.environ, MIXQ_TEST_KILL_AFTER=stage)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert not os.path.exists(out)  # never a half-written output
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout
    a, b = load_file(os.path.join(out, "output.safetensors")), load_file(os.path.join(outs[4.0], "output.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(tiny_src, tmp_path):
    cal = _calibration(tmp_path)
    with pytest.raises(MixqError, match="bpw for this model"):
        convert(str(tiny_src), str(tmp_path / "o1"), _opts(cal, bits=1.5))
    with pytest.raises(MixqError, match="--head-bits 7"):
        convert(str(tiny_src), str(tmp_path / "o2"), _opts(cal, head_bits=7))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(MixqError, match="calibration text is too short"):
        convert(str(tiny_src), str(tmp_path / "o3"), _opts(str(short)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MixqError, match="calibration data is empty"):
        convert(str(tiny_src), str(tmp_path / "o4"), _opts(str(empty)))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    with pytest.raises(MixqError, match="not empty"):
        convert(str(tiny_src), str(occupied), _opts(cal))
    for name in ("o1", "o2", "o3", "o4"):
        assert not os.path.exists(tmp_path / name)


def test_nan_weights_are_reported_with_their_layer(tiny_src, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "nan"
    shutil.copytree(tiny_src, src)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.1.block_sparse_moe.experts.2.w3.weight"][3, 5] = float("nan")
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(MixqError, match=r"model\.layers\.1\..*experts\.2\.w3.*NaN"):
        convert(str(src), str(tmp_path / "out"), _opts(_calibration(tmp_path)))


def test_dp_optimizer_is_optimal_and_beats_annealing():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    slots = []
    for _ in range(6):
        bits = sorted(torch.randint(100, 1000, (5,), generator=g).tolist())
        errs = sorted(torch.rand(5, generator=g).tolist(), reverse=True)
        slots.append([Option(b, e) for b, e in zip(bits, errs)])
    budget = int(sum(s[2].bits for s in slots))
    # brute force over all 5^6 choices
    import itertools

    best = min(
        (p for p in itertools.product(range(5), repeat=6) if total(slots, list(p))[0] <= budget),
        key=lambda p: total(slots, list(p))[1],
    )
    picks = solve(slots, budget, resolution=budget)  # unit of one bit: exact
    assert total(slots, picks)[0] <= budget
    assert total(slots, picks)[1] == pytest.approx(total(slots, list(best))[1])
    sa = anneal(slots, budget, runs_per_stage=4, steps=50)
    assert total(slots, sa)[0] <= budget
    assert total(slots, picks)[1] <= total(slots, sa)[1] + 1e-12


def _synthetic_measurement(cfg_dict, path):
    """A measurement.json with made-up accuracies (bits computed exactly), so a test can skip measuring."""
    from mixq.convert.candidates import attn_candidates, moe_candidates
    from mixq.convert.pipeline import _block_bits
    from mixq.model.config import MixtralConfig

    cfg = MixtralConfig.from_dict(cfg_dict)
    m = {}
    for i in range(cfg.num_hidden_layers):
        for key, rows in (("self_attn", attn_candidates()), ("block_sparse_moe", moe_candidates())):
            m[f"model.layers.{i}.{key}"] = [
                {
                    "accuracy": 1 - 2.0 ** -(_block_bits(r, cfg) / 1e5),
                    "total_bits": _block_bits(r, cfg),
                    **{k: qp.to_dict() for k, qp in r.items()},
                }
                for r in rows
            ]
    path.write_text(json.dumps({"measurement": m, "last_module_idx": 0}))


@pytest.mark.slow
def test_peak_host_memory_does_not_grow_with_layers(tmp_path):
    from conftest import make_hf_mixtral

    width = dict(TINY, hidden_size=512, intermediate_size=2048, num_local_experts=4)  # ~54 MB a layer (fp32)
    cal = _calibration(tmp_path)
    rss, layer_bytes = {}, None
    for n_layers in (2, 4):
        src = tmp_path / f"src{n_layers}"
        make_hf_mixtral(src, seed=n_layers, **dict(width, num_hidden_layers=n_layers))
        _tokenizer_files(src)
        cfg = json.loads((src / "config.json").read_text())
        _synthetic_measurement(cfg, tmp_path / f"m{n_layers}.json")
        out = tmp_path / f"out{n_layers}"
        code = (
            f"from mixq.convert.pipeline import *; convert({str(src)!r}, {str(out)!r}, ConvertOptions(bits=4.0, "
            f"calibration=[{cal!r}], rows=6, measure_rows=4, length=128, device='cpu', "
            f"measurement={str(tmp_path / f'm{n_layers}.json')!r}))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # The run's cost is printed (the files hold only what every resumed run writes alike).
        rss[n_layers] = float(re.search(r"peak host memory ([0-9.]+) GiB", proc.stdout).group(1)) * 2**30
        if layer_bytes is None:
            sd = load_file(str(src / "model.safetensors"))
            layer_bytes = sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith("model.layers.0."))
    # Holding the source would add 2 layers; allocator noise between runs is ~20 MB, well under one layer.
    assert rss[4] - rss[2] < layer_bytes, (rss, layer_bytes)
