"""`PackedBuffers`: a module whose quantized tensors, in a kernel layout, are its registered buffers."""

from __future__ import annotations

import torch
from torch import nn


class PackedBuffers(nn.Module):
    """Tensors of a kernel layout held as registered buffers, so that they move with the model (`.to`, `.half`) and
    count in `parameters()`/`buffers()`/`state_dict` like any weight: the module holds the one copy of them.

    A buffer equal to an earlier one is stored once (`perm` is `input_perm` when it was not folded). Scales are kept
    as their int16 bits (`bits=True`): a cast of the model (`.float()`, `.to(torch.bfloat16)`) is of its activations
    and must not round the quantized weights' fp16 scales.
    """

    def __init__(self) -> None:
        super().__init__()
        self._alias: dict[str, str] = {}
        self._bits: dict[str, torch.dtype] = {}

    def _add(self, key: str, t: torch.Tensor | None, *, bits: bool = False) -> None:
        if t is not None and bits:
            self._bits[key] = t.dtype
            t = t.view(torch.int16)
        for other, b in self._buffers.items():
            if t is not None and b is not None and b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t):
                self._alias[key] = other
                return
        self.register_buffer(key, t)

    def _get(self, key: str) -> torch.Tensor | None:
        t = self._buffers[self._alias.get(key, key)]
        return t if t is None or key not in self._bits else t.view(self._bits[key])
