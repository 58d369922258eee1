"""Resumable conversion state in the work directory; every file is written atomically (temp + rename)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixq.errors import MixqError


def atomic_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path + ".tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class Job:
    """`job.json` + hidden states + finished layers under `work_dir`.

    The job remembers a fingerprint of what determines the result (source, calibration, options); a
    work directory left by a different command is refused rather than silently mixed.
    """

    def __init__(self, work_dir: str, fingerprint: dict[str, Any]):
        self.dir = work_dir
        os.makedirs(os.path.join(work_dir, "out_tensor"), exist_ok=True)
        self.path = os.path.join(work_dir, "job.json")
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.state = json.load(f)
            if self.state.get("fingerprint") != key:
                raise MixqError(
                    f"{work_dir}: holds an unfinished conversion with other inputs or options; "
                    "delete it or pass another --work-dir"
                )
            self.resumed = True
        else:
            self.state = {
                "fingerprint": key,
                "inputs": fingerprint,
                "measure_done": -1,
                "quant_done": -1,
                "measurement": {},
                "strategy": None,
            }
            self.resumed = False
            self.save()

    def save(self) -> None:
        atomic_json(self.path, self.state)

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # Hidden states are named by the pass and the layer they feed, never overwritten in place: a kill between
    # writing layer i's output and saving `*_done = i` would otherwise resume layer i on its own output.
    def hidden_file(self, stage: str, layer: int) -> str:
        return self.file(f"{stage}_hidden_{layer}.safetensors")

    def save_hidden(self, stage: str, layer: int, x: torch.Tensor) -> None:
        atomic_tensors(self.hidden_file(stage, layer), {"hidden": x})

    def load_hidden(self, stage: str, layer: int) -> torch.Tensor:
        return load_file(self.hidden_file(stage, layer))["hidden"]

    def finish_layer(self, stage: str, layer: int) -> None:
        """Record `layer` of `stage` as done (its output already saved as the next layer's input), then drop
        its input: until the state is saved, a resume still finds the input it needs."""
        self.state[f"{stage}_done"] = layer
        self.save()
        try:
            os.remove(self.hidden_file(stage, layer))
        except FileNotFoundError:
            pass

    def layer_file(self, layer: int | str) -> str:
        return os.path.join(self.dir, "out_tensor", f"{layer}.safetensors")
