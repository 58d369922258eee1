"""The embedded demo model end to end: `mixq demo` (shortened) and the quality script (reduced)."""

import glob
import os
import subprocess
import sys

import pytest

from mixq.cli.demo import DEMO_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(os.path.join(DEMO_DIR, "config.json")), reason="no demo model"),
]


def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "mixq", "demo", "--quick", "--device", "cpu", "--max-new-tokens", "20"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "layer  attn bpw  moe bpw" in out  # the per-layer table of the converted model
    ppl = {
        line.split(":")[0].split()[-1]: float(line.split(":")[1].split()[0])
        for line in out.splitlines()
        if line.startswith("held-out perplexity")
    }
    assert set(ppl) == {"fp16", "bpw"} and all(1 < v < 1e4 for v in ppl.values()), out
    assert "It is a truth universally acknowledged, that" in out
    cached = glob.glob(os.path.join(tmp_path, "mixq", "demo-exl2-4bpw-quick-*", "config.json"))
    assert len(cached) == 1  # the conversion is cached under a key of the weights' content
    again = subprocess.run(
        [sys.executable, "-m", "mixq", "demo", "--quick", "--device", "cpu", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert again.returncode == 0 and "using the conversion cached in" in again.stdout, again.stderr[-2000:]


def test_quality_script_reduced(tmp_path):
    out = tmp_path / "quality"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "quality.py"),
            "--quick",
            "--bits",
            "4",
            "--device",
            "cpu",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "quality.md").read_text()
    for impl in ("fp16", "mixq", "gptq", "rtn"):
        assert f"| {impl} |" in table
    rows = {r.split("|")[1].strip(): float(r.split("|")[5]) for r in table.splitlines()[2:]}
    assert rows["fp16"] == 0.0 and all(v > 0 for k, v in rows.items() if k != "fp16")
