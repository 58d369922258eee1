"""Append measured figures to bench/results.jsonl (format: ../shared/docs/results-format.md)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(RESULTS),
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def model_id(model_dir: str) -> str:
    """First 12 hex digits of the SHA-256 of a checkpoint's weights, so figures name the exact model measured
    (the embedded demo model has been retrained; all its versions' figures share `arch: demo`)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with open(os.path.join(model_dir, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:12]


def append_result(
    metric: str, value, unit: str, config: dict, command: str | None = None, path: str = RESULTS, device: str = ""
) -> dict:
    """Append one measured figure; `value` must have been measured by the caller, never assumed. `device` overrides
    the detected one (the static model's figures say `static-sm_90`: read from the build, not run)."""
    line = {
        "metric": metric,
        "value": value,
        "unit": unit,
        "device": device or device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "config": config,
        "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return line
