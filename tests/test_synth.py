"""Synthetic EXL2 checkpoints: valid layers, loadable, bpw near the target, streamed shards, presets."""

import json
import math
import os
import random
import shutil
import tempfile

import pytest
import torch

import mixq
from mixq.cli.main import main
from mixq.errors import MixqError
from mixq.exl2.format import parse_exl2
from mixq.model.archs import ARCHS, arch_config
from mixq.model.checkpoint import TensorIndex
from mixq.model.config import MixtralConfig
from mixq.synthetic.exl2_checkpoint import random_linear, synth_model
from mixq.synthetic.hf_checkpoint import hf_config_dict

_BITS = {"I32": 32, "F16": 16, "I16": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP oversubscription on the shared 2-core machine (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_checkpoint(path: str, cfg: MixtralConfig, target: float) -> float:
    """parse_exl2 every quantized linear with the shapes config.json implies; returns the decoder bpw."""
    index = TensorIndex(path)
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    qs, kvs = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (H, qs), "k_proj": (H, kvs), "v_proj": (H, kvs), "o_proj": (qs, H)}
    expert = {"w1": (H, I), "w3": (H, I), "w2": (I, H)}
    bits = weights = 0
    for i in range(cfg.num_hidden_layers):
        linears = {f"model.layers.{i}.self_attn.{m}": s for m, s in shapes.items()}
        for e in range(E):
            linears.update({f"model.layers.{i}.block_sparse_moe.experts.{e}.{m}": s for m, s in expert.items()})
        for prefix, (K, N) in linears.items():
            parse_exl2(index.get_with_prefix(prefix), prefix, out_features=N, in_features=K)
            for suffix in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"):
                key = f"{prefix}.{suffix}"
                bits += math.prod(index.shape(key)) * _BITS[index.dtype(key)]
            weights += K * N
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert index.dtype(f"model.layers.{i}.{norm}.weight") == "F16"
        assert index.shape(f"model.layers.{i}.block_sparse_moe.gate.weight") == [E, H]
    assert index.dtype("model.embed_tokens.weight") == "F16"
    if "lm_head.q_weight" in index:
        parse_exl2(index.get_with_prefix("lm_head"), "lm_head", out_features=cfg.vocab_size, in_features=H)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        q = json.load(f)["quantization_config"]
    assert q["quant_method"] == "exl2" and q["bits"] == target
    assert not [f for f in os.listdir(path) if f.endswith((".tmp", ".partial"))]
    assert not os.path.exists(path.rstrip("/") + ".partial")
    return bits / weights


def _tiny_config_file(tmp_path) -> tuple[str, MixtralConfig]:
    cfg = MixtralConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    )
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(hf_config_dict(cfg, torch.float16)))
    return str(p), cfg


def test_tiny_config_checkpoint(tmp_path, capsys):
    cfg_path, cfg = _tiny_config_file(tmp_path)
    target = round(random.uniform(3.0, 6.0), 2)
    out = str(tmp_path / "synth")
    args = ["synth", out, "--arch", cfg_path, "--bits", str(target), "--shard-mb", "0.25", "--seed", "3"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    bpw = _check_checkpoint(out, cfg, target)
    assert abs(bpw - target) <= 0.1, (bpw, target)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1  # streamed in several shards
    model = mixq.load_model(out)
    assert model.exl2_linears == cfg.num_hidden_layers * (4 + 3 * cfg.num_local_experts) + 1
    ids = mixq.load_tokenizer(out).encode("The quick brown fox")
    logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()
    # the output directory must be fresh
    assert main(args) == 1


def test_8x7b_one_layer_real_shapes():
    cfg = arch_config("mixtral-8x7b", layers=1)
    target = random.choice([3.0, 4.0, 5.0])
    root = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    out = os.path.join(root, "m")
    try:
        assert main(["synth", out, "--arch", "mixtral-8x7b", "--layers", "1", "--bits", str(target)]) == 0
        bpw = _check_checkpoint(out, cfg, target)
        assert abs(bpw - target) <= 0.1, (bpw, target)
        loaded = MixtralConfig.from_dir(out)
        assert (loaded.hidden_size, loaded.intermediate_size, loaded.vocab_size) == (4096, 14336, 32000)
        assert (loaded.num_attention_heads, loaded.num_key_value_heads, loaded.rope_theta) == (32, 8, 1e6)
        model = mixq.load_model(out)
        assert model.exl2_linears == 4 + 24 + 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_presets_and_bad_input(tmp_path):
    big = ARCHS["mixtral-8x22b"]
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.num_attention_heads) == (
        6144,
        16384,
        56,
        48,
    )
    assert (big.vocab_size, big.max_position_embeddings, big.head_dim) == (32768, 65536, 128)
    assert ARCHS["mixtral-8x7b"].head_dim == 128
    with pytest.raises(MixqError, match="not a preset"):
        arch_config("mixtral-9x9b")
    with pytest.raises(MixqError, match="--bits 1.5"):
        synth_model(arch_config("mixtral-8x7b", layers=2), 1.5)
    assert main(["synth", str(tmp_path / "x"), "--arch", "mixtral-8x7b", "--bits", "4", "--head-bits", "7"]) == 1


def test_random_linear_statistics():
    from mixq.exl2.qparams import parse_recipe
    from mixq.exl2.reference import dequantize

    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    qp = parse_recipe(random.choice(["0.05:8b_32g/0.95:4b_128g", "0.1:3b_64g/0.9:2b_64g", "6b_128g"]))
    K, N = 512, 256
    t = random_linear(K, N, qp, g)
    parse_exl2({k.removeprefix("x."): v for k, v in t.to_dict("x").items()}, "x", out_features=N, in_features=K)
    w = dequantize(t, torch.float32)
    assert w.shape == (K, N)
    assert 0.5 * K**-0.5 < float(w.std()) < 2 * K**-0.5  # the std the generator aims for
    assert abs(t.bits_per_weight() - qp.bpw(K, N)) < 1e-9


def test_synth_model_in_memory():
    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        max_position_embeddings=256,
    )
    model = synth_model(cfg, 4.0, "cpu", seed=random.randrange(1000))
    out = model(torch.randint(0, 256, (2, 9)))
    assert out.shape == (2, 9, 256) and torch.isfinite(out).all()
    assert len(model.recipe.attn) == 2
