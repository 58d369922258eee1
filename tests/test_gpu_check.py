"""The rehearsal of bench/gpu_check.sh (the first GPU run as one call): its dry run on CPU at tiny sizes must run
each phase's command and write results lines that parse, carry the fields of shared/docs/results-format.md and
never touch bench/results.jsonl; a broken phase or a bad line must fail it."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench import check_results

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
RECORD = ROOT / "bench" / "results.jsonl"


def _dry_run(out: Path, *phases: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("MIXQ_CUDA_EMU", "MIXQ_RESULTS")}
    e.update({"OUT": str(out), "PYTHON": sys.executable, **env})
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *phases], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300
    )


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_gemm_and_attention(tmp_path):
    """The two kernel benchmarks (the cheapest phases that write results) at tiny shapes on the CPU references."""
    r = _dry_run(tmp_path, "build", "gemm", "attn")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert "summary.txt" in files and len(files) <= 8  # the device tool brings back 8 files at most
    summary = (tmp_path / "summary.txt").read_text()
    for phase in ("build", "gemm", "attn"):
        assert any(line.split()[:2] == [phase, "ok"] for line in summary.splitlines()), summary
    lines, bad = check_results.load(str(tmp_path / "results.jsonl"))
    assert not bad
    metrics = {x["metric"] for x in lines}
    assert {"copy_bandwidth", "kernel_us", "expert_matmul_bw_fraction", "decode_attention_bw_fraction"} <= metrics
    assert {x["device"] for x in lines} == {"cpu"}
    # None of them reached the record (other writers may append to it meanwhile: compare lines, not the file).
    record = {json.dumps(json.loads(x), sort_keys=True) for x in RECORD.read_text().splitlines() if x.strip()}
    assert not record & {json.dumps(x, sort_keys=True) for x in lines}, "the dry run wrote to bench/results.jsonl"
    shapes = {(x["config"].get("K"), x["config"].get("tokens")) for x in lines if x["metric"] == "kernel_us"}
    assert (256, 1) in shapes and (512, 16) in shapes  # --tiny shapes at the requested token counts


def test_dry_run_fails_when_a_phase_breaks(tmp_path):
    r = _dry_run(tmp_path, "gemm", PYTHON="false")  # every python command of the phase exits 1
    assert r.returncode != 0
    summary = (tmp_path / "summary.txt").read_text()
    assert any(line.split()[:2] == ["gemm", "rc=1"] for line in summary.splitlines()), summary


def _good_line(rng: random.Random) -> dict:
    return {
        "metric": rng.choice(["kernel_us", "decode_tokens_per_s", "copy_bandwidth"]),
        "value": rng.uniform(0.1, 1e4),
        "unit": "us",
        "device": "NVIDIA H200",
        "date": "2026-12-02",
        "commit": f"{rng.getrandbits(28):07x}",
        "config": {"arch": "mixtral-8x7b", "impl": "mixq", "tokens": rng.randint(1, 64)},
        "command": "python -m bench.bench_kernels",
    }


@pytest.mark.parametrize(
    "breakage",
    ["drop_field", "nan_value", "string_value", "bad_date", "no_impl", "truncated"],
)
def test_check_results_rejects_bad_lines(tmp_path, breakage):
    rng = random.Random()
    good = [_good_line(rng) for _ in range(rng.randint(2, 6))]
    bad = _good_line(rng)
    if breakage == "drop_field":
        del bad[rng.choice(["metric", "unit", "device", "date", "commit", "config", "command"])]
    elif breakage == "nan_value":
        bad["value"] = math.nan
    elif breakage == "string_value":
        bad["value"] = "12.5"
    elif breakage == "bad_date":
        bad["date"] = "02/12/2026"
    elif breakage == "no_impl":
        del bad["config"]["impl"]
    text = [json.dumps(x) for x in good]
    pos = rng.randint(0, len(text))
    text.insert(pos, json.dumps(bad)[:-7] if breakage == "truncated" else json.dumps(bad))
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(text) + "\n")
    lines, problems = check_results.load(str(path))
    assert len(lines) == len(good)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:{pos + 1}:")
    r = subprocess.run([sys.executable, "-m", "bench.check_results", str(path)], cwd=ROOT, capture_output=True)
    assert r.returncode == 1


def test_append_adds_gpu_lines_once(tmp_path):
    rng = random.Random()
    gpu = [_good_line(rng) for _ in range(3)]
    cpu = {**_good_line(rng), "device": "cpu"}
    src = tmp_path / "run.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in gpu + [cpu]))
    dest = tmp_path / "record.jsonl"
    assert check_results.append_new(check_results.load(str(src))[0], str(dest)) == 3
    assert check_results.append_new(check_results.load(str(src))[0], str(dest)) == 0
    assert [json.loads(x) for x in dest.read_text().splitlines()] == gpu
