"""`FusedExperts`: one MoE layer's experts in the grouped kernels' layout, held as buffers of the model."""

from __future__ import annotations

from mixq.kernels.moe import PreparedMoE, StackedExl2
from mixq.model.packed_buffers import PackedBuffers

PROJECTIONS = ("w1", "w3", "w2")
FIELDS = ("qweight", "qscale", "scale_max", "tile_group", "perm", "input_perm", "col_order")


class FusedExperts(PackedBuffers):
    """The stacked w1/w3/w2 of a `PreparedMoE` as registered buffers: once a layer is fused they are the only copy
    of its experts (`SparseMoE.fuse`). w1 and w3 both take w2's act-order as column order (stored once)."""

    def __init__(self, p: PreparedMoE):
        super().__init__()
        self._schedule = {name: (getattr(p, name).seg_bits, getattr(p, name).seg_rows) for name in PROJECTIONS}
        for name in PROJECTIONS:
            s = getattr(p, name)
            for f in FIELDS:
                t = getattr(s, f)
                self._add(f"{name}_{f}", t, bits=f == "scale_max")
        self._add("x_perm", p.x_perm)

    def _stacked(self, name: str) -> StackedExl2:
        t = {f: self._get(f"{name}_{f}") for f in FIELDS}
        seg_bits, seg_rows = self._schedule[name]
        return StackedExl2(**t, seg_bits=seg_bits, seg_rows=seg_rows)

    def prepared(self) -> PreparedMoE:
        """The kernels' view of the buffers (no copies); build it again after the module moves."""
        return PreparedMoE(*(self._stacked(name) for name in PROJECTIONS), x_perm=self._get("x_perm"))

    def extra_repr(self) -> str:
        w1 = self._get("w1_qweight")
        return f"{w1.shape[0]} experts, {sum(b.numel() * b.element_size() for b in self.buffers()) / 2**20:.1f} MiB"
