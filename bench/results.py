"""Append measured figures to bench/results.jsonl (format: ../shared/docs/results-format.md)."""

from __future__ import annotations

import datetime
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


def append_result(metric: str, value, unit: str, config: dict, command: str | None = None, path: str = RESULTS) -> dict:
    """Append one measured figure; `value` must have been measured by the caller, never assumed."""
    line = {
        "metric": metric,
        "value": value,
        "unit": unit,
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "config": config,
        "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return line
