"""`FusedExperts`: one MoE layer's experts in the grouped kernels' layout, held as buffers of the model."""

from __future__ import annotations

import torch
from torch import nn

from mixq.kernels.moe import PreparedMoE, StackedExl2

PROJECTIONS = ("w1", "w3", "w2")
FIELDS = ("qweight", "qscale", "scale_max", "tile_group", "perm", "input_perm", "col_order")


class FusedExperts(nn.Module):
    """The stacked w1/w3/w2 of a `PreparedMoE` as registered buffers, so that they move with the model (`.to`,
    `.half`) and count in `parameters()`/`buffers()`/`state_dict` like any weight: once a layer is fused they are
    the only copy of its experts (`SparseMoE.fuse`).

    A buffer equal to an earlier one is stored once (`perm` is `input_perm` when not folded; w1 and w3 both take
    w2's act-order as column order). `scale_max` is kept as its int16 bits: a cast of the model (`.float()`,
    `.to(torch.bfloat16)`) is of its activations and must not round the quantized weights' scales.
    """

    def __init__(self, p: PreparedMoE):
        super().__init__()
        self._alias: dict[str, str] = {}
        self._schedule = {name: (getattr(p, name).seg_bits, getattr(p, name).seg_rows) for name in PROJECTIONS}
        for name in PROJECTIONS:
            s = getattr(p, name)
            for f in FIELDS:
                t = getattr(s, f)
                self._add(f"{name}_{f}", t.view(torch.int16) if f == "scale_max" else t)
        self._add("x_perm", p.x_perm)

    def _add(self, key: str, t: torch.Tensor | None) -> None:
        for other, b in self._buffers.items():
            if t is not None and b is not None and b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t):
                self._alias[key] = other
                return
        self.register_buffer(key, t)

    def _get(self, key: str) -> torch.Tensor | None:
        return self._buffers[self._alias.get(key, key)]

    def _stacked(self, name: str) -> StackedExl2:
        t = {f: self._get(f"{name}_{f}") for f in FIELDS}
        t["scale_max"] = t["scale_max"].view(torch.float16)
        seg_bits, seg_rows = self._schedule[name]
        return StackedExl2(**t, seg_bits=seg_bits, seg_rows=seg_rows)

    def prepared(self) -> PreparedMoE:
        """The kernels' view of the buffers (no copies); build it again after the module moves."""
        return PreparedMoE(*(self._stacked(name) for name in PROJECTIONS), x_perm=self._get("x_perm"))

    def extra_repr(self) -> str:
        w1 = self._get("w1_qweight")
        return f"{w1.shape[0]} experts, {sum(b.numel() * b.element_size() for b in self.buffers()) / 2**20:.1f} MiB"
