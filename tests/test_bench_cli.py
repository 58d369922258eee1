"""`mixq bench` on a tiny model: table, JSON, byte accounting, results.jsonl records, bad input."""

import itertools
import json
import random
import re

import pytest
import torch

from mixq.cli.bench import expected_experts
from mixq.cli.main import main


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP oversubscription on the shared 2-core machine (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("bench") / "m"
    cfg = write_random_checkpoint(str(path), seed=random.randrange(1000))
    return str(path), cfg


def test_expected_experts_brute_force():
    E, k, b = random.choice([(4, 2, 3), (8, 2, 2), (5, 1, 3)])
    choices = list(itertools.combinations(range(E), k))
    combos = list(itertools.product(choices, repeat=b))
    mean = sum(len(set(itertools.chain(*c))) for c in combos) / len(combos)
    assert abs(expected_experts(E, k, b) - mean) < 1e-9


def test_bench_table(tiny, capsys):
    path, _ = tiny
    assert main(["bench", path, "--device", "cpu", "--batch", "1,3", "--prompt-len", "12", "--gen-len", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"prefill [\d.]+ tok/s, time to first token [\d.]+ s", out), out
    for b in (1, 3):
        assert re.search(rf"^\s+{b}\s+[\d.]+\s+[\d.]+\s+\d+\s+[\d.]+\s+[\d.]+$", out, re.M), out


def test_bench_json_and_byte_accounting(tiny, capsys):
    path, cfg = tiny
    args = ["bench", path, "--device", "cpu", "--batch", "2", "--prompt-len", "10", "--gen-len", "4", "--json"]
    assert main(args + ["--cache", "q4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["device"] == "cpu" and res["cache"] == "q4" and res["peak_vram_device_gib"] is None
    assert res["prefill_tokens_per_s"] > 0 and res["time_to_first_token_s"] > 0 and res["copy_bandwidth_gbs"] > 0
    (d,) = res["decode"]
    assert d["batch"] == 2 and d["tokens_per_s"] > 0
    assert abs(d["tokens_per_s"] - 2 / (d["step_ms"] / 1e3)) < 1e-6 * d["tokens_per_s"]
    # fp32 on the CPU: 4 bytes per weight. Per layer attention, router, two norms; head and final norm.
    H, I, E, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    always = 4 * (L * (2 * H * q + 2 * H * kv + E * H + 2 * H) + V * H + H)
    hit = E * (1 - (1 - 2 / E) ** 2)
    cache = 2 * d["context"] * 2 * L * kv * (0.5 + 2 / 32)
    expect = always + L * hit * 4 * 3 * H * I + cache
    assert abs(d["bytes_per_step"] - expect) <= 0.01 * expect
    assert 10 <= d["context"] <= 10 + 4 + 4  # mean cached context over the timed window
    assert abs(d["bw_fraction"] - d["bytes_per_step"] / (d["step_ms"] / 1e3) / (res["copy_bandwidth_gbs"] * 1e9)) < 1e-6


def test_bench_record(tiny, tmp_path, monkeypatch, capsys):
    path, _ = tiny
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("MIXQ_RESULTS", str(results))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    args = ["bench", path, "--device", "cpu", "--batch", "1,2", "--prompt-len", "8", "--gen-len", "2", "--record"]
    assert main(args) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    metrics = [x["metric"] for x in lines]
    assert metrics.count("decode_tokens_per_s") == 2 and metrics.count("decode_bw_fraction") == 2
    assert {"prefill_tokens_per_s", "copy_bandwidth"} <= set(metrics)
    for x in lines:
        assert set(x) == {"metric", "value", "unit", "device", "date", "commit", "config", "command"}
        assert x["device"] == "cpu" and x["config"]["impl"] == "mixq" and x["config"]["cache"] == "fp16"
        assert isinstance(x["value"], float) and x["value"] > 0
    assert {x["config"]["batch"] for x in lines if x["metric"] == "decode_tokens_per_s"} == {1, 2}


def test_bench_bad_input(tiny, capsys):
    path, _ = tiny
    with pytest.raises(SystemExit):
        main(["bench", path, "--batch", "0"])
    assert main(["bench", path, "--device", "cpu", "--prompt-len", "5000", "--gen-len", "4", "--batch", "1"]) == 1
    assert "positions" in capsys.readouterr().err
