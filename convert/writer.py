"""Write the finished EXL2 checkpoint: shards, config.json, copied tokenizer files, reports.

Everything goes to `<out>.partial` first and is renamed to `<out>` at the very end, so `<out>` only
ever holds a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from mixq import __version__
from mixq.errors import MixqError

SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def check_output_dir(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise MixqError(f"{out}: output directory exists and is not empty; choose a new directory or remove it")


def shard_tensors(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split into shards of at most `shard_bytes` (a tensor is never split; 0 = one shard)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shard_bytes and size + n > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v.contiguous()
        size += n
    return shards


def write_checkpoint(
    src: str, out: str, tensors: dict[str, torch.Tensor], quant_config: dict, reports: dict, shard_mb: int = 8192
) -> None:
    tmp = out.rstrip("/") + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    shards = shard_tensors(tensors, shard_mb * 2**20)
    for i, shard in enumerate(shards):
        name = "output.safetensors" if len(shards) == 1 else f"output-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
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
