"""Memory planner: sizes against hand arithmetic, fit boundaries, max context, refusal line, CLI wiring."""

import random
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from mixq.engine.planner import (
    CUDA_CONTEXT_BYTES,
    cache_bytes,
    checkpoint_bytes,
    max_context,
    plan,
    preflight,
    refusal,
    resolve_max_seq_len,
)
from mixq.errors import MixqError
from mixq.model.archs import ARCHS

GiB = 2**30


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP oversubscription on the shared 2-core machine (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _8x7b(bits=4.0):
    return replace(ARCHS["mixtral-8x7b"], raw={"quantization_config": {"quant_method": "exl2", "bits": bits}})


def test_cache_sizes_match_the_per_token_table():
    cfg = _8x7b()
    # 32 layers x (K and V) x 8 kv heads x 128 values: 128 KiB/token in fp16, 4 GiB at 32k tokens.
    assert cache_bytes(cfg, 32768, "fp16") == 32 * 2 * 8 * 128 * 2 * 32768 == 4 * GiB
    assert cache_bytes(cfg, 32768, "q8") == 32 * 2 * 1024 * (1 + 2 / 32) * 32768 == 2.125 * GiB
    assert cache_bytes(cfg, 32768, "q4") == 32 * 2 * 1024 * (0.5 + 2 / 32) * 32768 == 1.125 * GiB
    assert cache_bytes(cfg, 32768, "fp8") == 2 * GiB
    big = ARCHS["mixtral-8x22b"]
    assert cache_bytes(big, 1, "fp16") == 224 * 1024  # 224 KiB/token


@pytest.mark.parametrize("mode", ["fp16", "q8", "q4"])
def test_plan_arithmetic(mode):
    cfg = _8x7b()
    seq, batch, page = random.randint(100, 40000), random.randint(1, 4), random.choice([16, 256])
    weights = random.randint(10 * GiB, 30 * GiB)
    p = plan(cfg, weights, max_seq_len=seq, batch=batch, cache_mode=mode, page_size=page, device_bytes=80 * GiB)
    embed = 32000 * 4096 * 2
    assert p.weights == weights - embed
    tokens = batch * ((seq + page - 1) // page) * page
    per_value = {"fp16": 2, "q8": 1.0625, "q4": 0.5625}[mode]
    assert p.cache == 32 * 2 * 1024 * per_value * tokens
    T = min(2048, batch * seq)
    scratch = (
        2 * T * (4096 + 4096)  # residual + normed hidden
        + 2 * T * (4096 + 1024 + 1024)  # q, k, v
        + 2 * T * 4096  # attention output
        + 2 * 2 * T * 128  # rope cos, sin
        + T * seq  # bool mask
        + 4 * T * 8  # router logits fp32
        + 2 * T * 2 * (14336 + 14336 + 4096)  # top-2: gate, up, expert output
        + 4 * T * 32000  # fp32 logits
        + 2 * 4096 * 14336  # one dequantized expert matrix
        + (0 if mode == "fp16" else 2 * 2 * seq * 1024)  # one layer's K, V of one sequence, dequantized
    )
    assert p.scratch == scratch
    assert p.cuda_context == CUDA_CONTEXT_BYTES == 512 * 2**20
    assert p.total == p.weights + p.cache + p.scratch + p.cuda_context
    assert plan(cfg, weights, max_seq_len=seq, batch=batch, cache_mode=mode, page_size=page, device_bytes=p.total).fits
    assert not plan(
        cfg, weights, max_seq_len=seq, batch=batch, cache_mode=mode, page_size=page, device_bytes=p.total - 1
    ).fits
    on_dev = plan(
        cfg, weights, max_seq_len=seq, batch=batch, cache_mode=mode, page_size=page, device_bytes=1, embed_on_host=False
    )
    assert on_dev.weights == weights


def test_max_context_is_the_boundary():
    cfg = _8x7b()
    w = random.randint(15 * GiB, 22 * GiB)
    kw = dict(batch=1, page_size=16, device_bytes=int(random.uniform(23, 30) * GiB))
    fit = {m: max_context(cfg, w, cache_mode=m, **kw) for m in ("fp16", "q8", "q4")}
    assert 0 < fit["fp16"] < fit["q8"] < fit["q4"]
    for m, n in fit.items():
        assert n % 16 == 0
        assert plan(cfg, w, max_seq_len=n, cache_mode=m, **kw).fits
        assert not plan(cfg, w, max_seq_len=n + 16, cache_mode=m, **kw).fits
    assert max_context(cfg, 40 * GiB, cache_mode="q4", **kw) == 0


def test_refusal_line_and_resolve():
    cfg = _8x7b()
    w = int(random.uniform(19, 21.9) * GiB)  # 21.9: about what 4.0 bpw 8x7B weighs with embedding and head
    kw = dict(batch=1, page_size=16, device_bytes=int(23.5 * GiB))
    msg = refusal(cfg, w, max_seq_len=32768, cache_mode="fp16", **kw)
    m = re.fullmatch(
        r"Mixtral-8x7B EXL2 4\.0 bpw needs (\d+\.\d) GiB at 32768 tokens with fp16 cache but the GPU has 23\.5 GiB "
        r"free; fits (\d+)k tokens at fp16 cache, (\d+)k at q8, (\d+)k at q4 \(use (.*)\)",
        msg,
    )
    assert m, msg
    need = plan(cfg, w, max_seq_len=32768, cache_mode="fp16", **kw).total
    assert float(m.group(1)) == round(need / GiB, 1)
    fits = {mode: max_context(cfg, w, cache_mode=mode, **kw) for mode in ("fp16", "q8", "q4")}
    assert [int(m.group(i)) for i in (2, 3, 4)] == [fits[k] // 1000 for k in ("fp16", "q8", "q4")]
    better = next((f"--cache {k} or " for k in ("q8", "q4") if fits[k] >= 32768), "")
    assert m.group(5) == f"{better}--max-seq-len {fits['fp16'] // 1000 * 1000}"
    with pytest.raises(MixqError, match="needs"):
        resolve_max_seq_len(cfg, w, 32768, cache_mode="fp16", **kw)
    with pytest.raises(MixqError, match="needs"):
        resolve_max_seq_len(cfg, w, None, cache_mode="fp16", **kw)
    assert resolve_max_seq_len(cfg, w, "auto", cache_mode="fp16", **kw) == fits["fp16"]
    assert resolve_max_seq_len(cfg, w, "auto", cache_mode="q4", **kw) == min(fits["q4"], 32768)
    assert resolve_max_seq_len(cfg, w, 1000, cache_mode="q8", **kw) == 1000
    with pytest.raises(MixqError, match="weights alone need"):
        resolve_max_seq_len(cfg, 40 * GiB, "auto", cache_mode="q4", **kw)


def test_checkpoint_bytes_from_headers(tmp_path):
    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    write_random_checkpoint(str(tmp_path), seed=random.randrange(1000), shard_layers=1)
    total = embed = 0
    for f in tmp_path.glob("*.safetensors"):
        for k, t in load_file(str(f)).items():
            total += t.numel() * t.element_size()
            embed += t.numel() * t.element_size() if k == "model.embed_tokens.weight" else 0
    assert checkpoint_bytes(str(tmp_path)) == (total, embed)


def test_cli_cache_and_auto_on_cpu(tmp_path, capsys):
    from mixq.cli.main import main
    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    write_random_checkpoint(str(tmp_path), seed=random.randrange(1000))
    assert preflight(str(tmp_path), "cpu", "auto", "q4") is None
    assert preflight(str(tmp_path), "cpu", 77, "q4") == 77
    base = ["generate", str(tmp_path), "--prompt", "The quick", "--device", "cpu", "--greedy", "--max-new-tokens", "4"]
    outs = {}
    for mode in ("fp16", "q8"):
        assert main(base + ["--cache", mode, "--max-seq-len", "auto"]) == 0
        outs[mode] = capsys.readouterr().out
    assert outs["fp16"].startswith("The quick") and outs["q8"].startswith("The quick")
    with pytest.raises(SystemExit):
        main(base + ["--max-seq-len", "lots"])
    with pytest.raises(SystemExit):
        main(base + ["--cache", "q5"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_preflight_refuses_on_cuda(tmp_path):
    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    write_random_checkpoint(str(tmp_path), seed=0)
    free, _ = torch.cuda.mem_get_info()
    assert preflight(str(tmp_path), "cuda", 64, "fp16") == 64
    n = preflight(str(tmp_path), "cuda", "auto", "q8")
    assert 0 < n <= 2048
    with pytest.raises(MixqError, match="needs"):
        preflight(str(tmp_path), "cuda", 10 * free // 1024, "fp16")  # far more tokens than memory
