"""Stream tensors into safetensors shards without holding a shard in memory.

A safetensors file starts with a JSON header that lists every tensor's byte range, so a writer that only
knows the tensors as they arrive appends their bytes to a data file, and at the end writes the header and
copies the data behind it. Memory is one `add()` call's tensors (a layer), never a shard or the model.
Files appear under their final names only in `finish()`; callers build inside a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field

import torch

_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


@dataclass
class _Shard:
    data_path: str
    entries: dict[str, dict] = field(default_factory=dict)
    size: int = 0


class ShardWriter:
    """Shards of at most `shard_bytes` (a tensor is never split; 0: one shard) named like exllamav2's and
    transformers': `<stem>.safetensors`, or `<stem>-00001-of-00003.safetensors` when there are several."""

    def __init__(self, directory: str, stem: str, shard_bytes: int = 0, metadata: dict[str, str] | None = None):
        self.dir, self.stem, self.shard_bytes = directory, stem, shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[_Shard] = []
        self._file = None
        self._names: set[str] = set()
        self.bytes_written = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if t.dtype not in _DTYPES:
                raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
            data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            shard = self.shards[-1] if self.shards else None
            if shard is None or (self.shard_bytes and shard.size and shard.size + data.nbytes > self.shard_bytes):
                shard = self._open_shard()
            if name in self._names:
                raise ValueError(f"{name}: tensor written twice")
            self._names.add(name)
            shard.entries[name] = {
                "dtype": _DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [shard.size, shard.size + data.nbytes],
            }
            self._file.write(data.tobytes())
            shard.size += data.nbytes
            self.bytes_written += data.nbytes

    def _open_shard(self) -> _Shard:
        if self._file is not None:
            self._file.close()
        shard = _Shard(os.path.join(self.dir, f".{self.stem}-{len(self.shards) + 1:05d}.data"))
        self._file = open(shard.data_path, "wb")
        self.shards.append(shard)
        return shard

    def finish(self) -> dict[str, str]:
        """Write the shards under their final names; returns the weight map (tensor name -> file name)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        weight_map: dict[str, str] = {}
        n = len(self.shards)
        for i, shard in enumerate(self.shards):
            name = f"{self.stem}.safetensors" if n == 1 else f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            header = json.dumps({"__metadata__": self.metadata, **shard.entries}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
            tmp = os.path.join(self.dir, name + ".tmp")
            with open(tmp, "wb") as out, open(shard.data_path, "rb") as data:
                out.write(struct.pack("<Q", len(header)) + header)
                shutil.copyfileobj(data, out, 16 * 2**20)
            os.remove(shard.data_path)
            os.replace(tmp, os.path.join(self.dir, name))
            weight_map.update(dict.fromkeys(shard.entries, name))
        return weight_map
