"""Typed metadata of one EXL2 linear and the validation of its tensors (docs/exl2-format.md sections 2, 3.5).

`parse_exl2` rejects, with one line naming the tensor, anything exllamav2's kernels would silently misread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixq.errors import FormatError
from mixq.exl2.pack import make_q_groups, pack_q_weight, pack_scales

SUFFIXES = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
MAX_K = 65535  # the runtime casts the permutation to (u)int16


@dataclass(frozen=True)
class Exl2Group:
    bits: int
    rows: int  # stored (input) rows of the group
    row_start: int  # first stored row
    qrow_start: int  # first q_weight row (int32 units), as in q_groups


@dataclass
class Exl2Tensors:
    """The five (six) tensors of one quantized linear. `q_weight` is [packed rows, N], N a multiple of 32."""

    q_weight: torch.Tensor
    q_invperm: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    bias: torch.Tensor | None = None
    # Group list derived from q_groups; kept as plain Python so device copies need no host sync to get it.
    meta: list[Exl2Group] | None = field(default=None, repr=False, compare=False)

    @property
    def groups(self) -> list[Exl2Group]:
        if self.meta is None:
            self.meta = _groups_from(self.q_groups.tolist(), self.q_weight.shape[0], "q_groups")
        return self.meta

    @property
    def group_bits(self) -> list[tuple[int, int]]:
        return [(g.bits, g.rows) for g in self.groups]

    @property
    def in_features(self) -> int:
        return sum(g.rows for g in self.groups)

    @property
    def out_features(self) -> int:
        return self.q_weight.shape[1]

    @property
    def q_perm(self) -> torch.Tensor:
        """q_perm[k] = original input feature of stored row k."""
        return torch.argsort(self.q_invperm)

    @property
    def rows_per_bits(self) -> dict[int, tuple[int, int]]:
        """Stored-row range [start, end) of each bit width present (contiguous, highest width first)."""
        out: dict[int, tuple[int, int]] = {}
        for g in self.groups:
            s, _ = out.get(g.bits, (g.row_start, 0))
            out[g.bits] = (s, g.row_start + g.rows)
        return out

    def total_bits(self) -> int:
        """Bits as exllamav2's accounting counts them (section 5.3)."""
        K, N, G = self.in_features, self.out_features, len(self.groups)
        t = sum(g.rows * g.bits for g in self.groups) * N + 16 * G + 32 * G + 4 * G * N + 32 * K
        return t + (16 * N if self.bias is not None else 0)

    def bits_per_weight(self) -> float:
        return self.total_bits() / (self.in_features * self.out_features)

    def to(self, device: torch.device | str) -> Exl2Tensors:
        mv = {k: getattr(self, k).to(device) for k in SUFFIXES}
        bias = self.bias.to(device) if self.bias is not None else None
        return Exl2Tensors(**mv, bias=bias, meta=self.meta)

    def to_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to write, keyed `<prefix>.q_weight` etc. (contiguous CPU tensors, file dtypes)."""
        d = {f"{prefix}.{k}": getattr(self, k).detach().contiguous().cpu() for k in SUFFIXES}
        if self.bias is not None:
            d[f"{prefix}.bias"] = self.bias.detach().to(torch.float16).contiguous().cpu()
        return d


def _groups_from(flat: list[int], q_rows: int, where: str) -> list[Exl2Group]:
    """Group list from q_groups values; every error names `where`."""
    if len(flat) == 0 or len(flat) % 2:
        raise FormatError(f"{where}: has {len(flat)} elements; expected (bits, start) pairs, at least one group")
    bits, starts = flat[0::2], flat[1::2]
    G = len(bits)
    if starts[0] != 0:
        raise FormatError(f"{where}: group 0 starts at q_weight row {starts[0]}; it must start at 0")
    for g, b in enumerate(bits):
        if b not in (2, 3, 4, 5, 6, 8):
            raise FormatError(f"{where}: group {g} has {b} bits; EXL2 groups have 2, 3, 4, 5, 6 or 8 bits")
        if g and b > bits[g - 1]:
            raise FormatError(
                f"{where}: group {g} has {b} bits after a {bits[g - 1]}-bit group; "
                "EXL2 kernels need groups ordered by non-increasing bits"
            )
    groups, row = [], 0
    for g in range(G):
        b = bits[g]
        end = starts[g + 1] if g + 1 < G else q_rows
        words = end - starts[g]
        if words <= 0:
            raise FormatError(
                f"{where}: group {g} spans q_weight rows {starts[g]}..{end} (q_weight has {q_rows}); "
                "start offsets must increase and stay inside q_weight"
            )
        if words * 32 % b:
            raise FormatError(f"{where}: group {g} has {words} packed words, not a whole number of {b}-bit rows")
        rows = words * 32 // b
        if rows % 32:
            raise FormatError(
                f"{where}: group {g} has {rows} rows; EXL2 kernels need group sizes that are multiples of 32"
            )
        groups.append(Exl2Group(b, rows, row, starts[g]))
        row += rows
    return groups


def parse_exl2(
    tensors: dict[str, torch.Tensor], name: str, out_features: int | None = None, in_features: int | None = None
) -> Exl2Tensors:
    """Validate the tensors of one EXL2 linear (keys are the suffixes: q_weight, ..., optional bias).

    `out_features`, if given, is the unpadded output width the model expects; the stored width must be it
    rounded up to 32. Raises FormatError with one line naming `<name>.<tensor>`.
    """
    for k in SUFFIXES:
        if k not in tensors:
            raise FormatError(f"{name}.{k}: missing; an EXL2 layer needs {', '.join(SUFFIXES)}")
    expect = {
        "q_weight": (torch.int32, 2),
        "q_invperm": (torch.int32, 1),
        "q_scale": (torch.int32, 2),
        "q_scale_max": (torch.float16, 1),
        "q_groups": (torch.int16, 1),
    }
    for k, (dt, nd) in expect.items():
        t = tensors[k]
        if t.dtype != dt:
            raise FormatError(f"{name}.{k}: dtype {t.dtype} but EXL2 requires {dt}; the file was written wrongly")
        if t.dim() != nd:
            raise FormatError(f"{name}.{k}: shape {list(t.shape)} but EXL2 requires a {nd}-D tensor")
    qw, qi, qs, qm, qg = (tensors[k] for k in SUFFIXES)
    N = qw.shape[1]
    if N == 0 or N % 32:
        raise FormatError(f"{name}.q_weight: width {N} is not a positive multiple of 32 (pad the output to 32)")
    groups = _groups_from(qg.tolist(), qw.shape[0], f"{name}.q_groups")
    G = len(groups)
    K = sum(g.rows for g in groups)
    if qw.shape[0] != sum(g.rows * g.bits // 32 for g in groups):
        raise FormatError(f"{name}.q_weight: {qw.shape[0]} packed rows disagree with q_groups")
    if K > MAX_K:
        raise FormatError(f"{name}.q_weight: K={K} input rows exceed the 16-bit permutation limit {MAX_K}")
    if list(qs.shape) != [G, N // 8]:
        raise FormatError(f"{name}.q_scale: shape {list(qs.shape)} but q_groups/q_weight imply [{G}, {N // 8}]")
    if list(qm.shape) != [G]:
        raise FormatError(f"{name}.q_scale_max: shape {list(qm.shape)} but q_groups has {G} groups")
    bad = int((~torch.isfinite(qm)).sum())
    if bad:
        raise FormatError(f"{name}.q_scale_max: {bad} of {G} values are NaN or inf; the file is damaged")
    if list(qi.shape) != [K]:
        raise FormatError(f"{name}.q_invperm: length {qi.shape[0]} but q_groups/q_weight imply K={K}")
    seen = torch.zeros(K, dtype=torch.bool, device=qi.device)
    ok = bool(((qi >= 0) & (qi < K)).all())
    if ok:
        seen[qi.long()] = True
        ok = bool(seen.all())
    if not ok:
        raise FormatError(f"{name}.q_invperm: is not a permutation of 0..{K - 1}")
    if in_features is not None and K != in_features:
        raise FormatError(f"{name}.q_weight: describes {K} input features but the model expects {in_features}")
    if out_features is not None and N != -(-out_features // 32) * 32:
        raise FormatError(f"{name}.q_weight: width {N} but the model's {out_features} outputs pad to a multiple of 32")
    bias = tensors.get("bias")
    if bias is not None:
        if not bias.is_floating_point() or list(bias.shape) != [N]:
            raise FormatError(f"{name}.bias: {bias.dtype} {list(bias.shape)} but EXL2 needs a float vector of {N}")
        bad = int((~torch.isfinite(bias)).sum())
        if bad:
            raise FormatError(f"{name}.bias: {bad} of {N} values are NaN or inf; the file is damaged")
        bias = bias.to(torch.float16)
    return Exl2Tensors(qw, qi, qs, qm, qg, bias, meta=groups)


def make_exl2(
    q: torch.Tensor,
    group_bits: list[tuple[int, int]],
    scale_codes: torch.Tensor,
    scale_max: torch.Tensor,
    invperm: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> Exl2Tensors:
    """Pack codes `q[K, N]` (stored order), scale codes `[G, N]` and per-group maxima into tensors."""
    dev = q.device
    t = Exl2Tensors(
        q_weight=pack_q_weight(q, group_bits),
        q_invperm=invperm.to(torch.int32),
        q_scale=pack_scales(scale_codes),
        q_scale_max=scale_max.to(torch.float16),
        q_groups=make_q_groups(group_bits, device=dev),
        bias=None if bias is None else bias.to(torch.float16),
    )
    t.meta = _groups_from(t.q_groups.tolist(), t.q_weight.shape[0], "q_groups")
    return t
