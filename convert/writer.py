"""Write the finished EXL2 checkpoint: shards, config.json, copied tokenizer files, reports.

Everything goes to `<out>.partial` first (shards streamed, one layer in memory) and is renamed to `<out>`
at the very end, so `<out>` only ever holds a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from mixq import __version__
from mixq.errors import MixqError
from mixq.model.shards import ShardWriter

SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def check_output_dir(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise MixqError(f"{out}: output directory exists and is not empty; choose a new directory or remove it")


class CheckpointWriter:
    """Builds the checkpoint in `<out>.partial`: tensors stream into shards as they are added (memory: one
    layer), `finish` adds config.json, the source's tokenizer files and the reports, then renames."""

    def __init__(self, out: str, shard_mb: int = 8192):
        self.out = out
        self.tmp = out.rstrip("/") + ".partial"
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        self.shards = ShardWriter(self.tmp, "output", shard_mb * 2**20)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.shards.add(tensors)

    def finish(self, src: str, quant_config: dict, reports: dict) -> None:
        tmp, out = self.tmp, self.out
        self.shards.finish()
        for f in sorted(os.listdir(src)):  # tokenizer, generation config, licence, README...
            p = os.path.join(src, f)
            if os.path.isfile(p) and not f.endswith(SKIP_SUFFIXES) and f != "config.json":
                shutil.copy2(p, os.path.join(tmp, f))
        with open(os.path.join(src, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
        cfg["quantization_config"] = {"quant_method": "exl2", "version": f"mixq-{__version__}", **quant_config}
        cfg["torch_dtype"] = "float16"
        cfg.pop("dtype", None)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(cfg, fh, indent=2)
        for name, data in reports.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked before the conversion started)
        os.replace(tmp, out)
