"""Find and read the tensors of a safetensors checkpoint directory.

Like exllamav2 we glob `*.safetensors` and map every key to its file instead of trusting an index
file; the index is only used to name shards that should exist but do not.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors import safe_open

from mixq.errors import CheckpointError


@contextmanager
def _reading(file: str, key: str) -> Iterator[None]:
    """safetensors' own errors on a damaged file become one CheckpointError line naming the file and tensor."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{file}: cannot read tensor {key} ({type(e).__name__}); the file is truncated or corrupt, "
            "download or convert it again"
        ) from None


class TensorIndex:
    """Key -> shard map over all `*.safetensors` files of a directory, with lazy (mmap) reads."""

    def __init__(self, path: str):
        self.path = path
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        self._check_index(files)
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files found; mixq loads safetensors checkpoints only")
        self.key_to_file: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        for f in files:
            for key in self._open(f).keys():
                self.key_to_file[key] = f

    def _check_index(self, files: list[str]) -> None:
        for index in glob.glob(os.path.join(self.path, "*.safetensors.index.json")):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh).get("weight_map", {})
            except (OSError, json.JSONDecodeError):
                continue  # a stale or broken index is not used for anything else
            present = {os.path.basename(f) for f in files}
            for shard in sorted(set(weight_map.values())):
                if shard not in present:
                    raise CheckpointError(
                        f"{os.path.join(self.path, shard)}: shard listed in {os.path.basename(index)} is missing; "
                        "download or copy it again"
                    )

    def _open(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises several error types for damaged files
                size = os.path.getsize(file) if os.path.exists(file) else 0
                raise CheckpointError(
                    f"{file}: cannot read safetensors header ({size} bytes; {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'corrupt'}); the file is truncated or corrupt, "
                    "download or convert it again"
                ) from None
            self._handles[file] = handle
        return handle

    def close(self) -> None:
        """Drop the open shard mappings (they reopen on the next read), releasing their resident pages."""
        self._handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self) -> Iterator[str]:
        return iter(self.key_to_file)

    def shape(self, key: str) -> list[int]:
        return list(self._open(self.key_to_file[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """safetensors dtype name (F16, BF16, F32, I32, I16, ...)."""
        return self._open(self.key_to_file[key]).get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        file = self.key_to_file.get(key)
        if file is None:
            raise CheckpointError(
                f"{key}: tensor missing from the *.safetensors files in {self.path} (incomplete download or "
                "a different architecture?)"
            )
        with _reading(file, key):
            return self._open(file).get_tensor(key)

    def chunks(self, key: str, max_bytes: int = 1 << 28) -> Iterator[torch.Tensor]:
        """`key` as runs of whole rows of at most ~`max_bytes` each (a scan holds one run, never a 2 GB tensor)."""
        file = self.key_to_file[key]
        shape = self.shape(key)
        row_elems = 1
        for d in shape[1:]:
            row_elems *= d
        with _reading(file, key):
            if len(shape) < 2:
                yield self._open(file).get_tensor(key)
                return
            sl = self._open(file).get_slice(key)
            step = max(1, max_bytes // max(1, row_elems * 4))
            for start in range(0, shape[0], step):
                yield sl[start : start + step]

    def get_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors `prefix.<suffix>` as {suffix: tensor} (used for EXL2 layers)."""
        p = prefix + "."
        return {k[len(p) :]: self.get(k) for k in self.key_to_file if k.startswith(p) and "." not in k[len(p) :]}

    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in set(self.key_to_file.values()))
