"""Load-time preparation of EXL2 matrices for mixq's CUDA kernels, and its exact inverse (the CPU twin).

Kernel layout ("planar tiles"). The stored rows of a matrix are cut into tiles of 32 rows; EXL2 group
boundaries are multiples of 32 rows, so a tile has one bit width `b` and one scale group. For one output
column a tile is 32 codes = `b` 32-bit words, exactly as on disk, but the bits are re-arranged so that no code
straddles a word. 2-, 4- and 8-bit tiles are planar: code `i` sits whole in word `i // (32/b)` at bit
`b * (i % (32/b))`. 3-, 5- and 6-bit tiles are laid out for the matmul loop instead ("lane bytes",
csrc/exl2/dequant_half2.cuh): pair p = rows (2p, 2p + 1), and the 8 codes of pairs 4g..4g+3 (a_i = row 8g + 2i,
b_i = row 8g + 2i + 1) are bytes that one lane of the loop reads. 3-bit: X = a0 | a1 << 3 | (a2 & 3) << 6, Z = the
same of b, Y = a2 >> 2 | a3 << 1 | b3 << 4 | (b2 >> 2) << 7, and the words are X0 Y0 X1 Y1, X2 Y2 X3 Y3, Z0 Z1 Z2 Z3
(bytes from the low end). 5-bit: word g is A = a0 | a1 << 5 | a2 << 10 | (a3 >> 4) << 15 | b0 << 16 | b1 << 21 |
b2 << 26 | (b3 & 1) << 31, and byte g of word 4 is X = b3 >> 1 | (a3 & 15) << 4. 6-bit: word g is
A = a0 | a1 << 6 | (a3 & 15) << 12 | b0 << 16 | b1 << 22 | (b3 & 15) << 28, and E0 | E1 << 8 (E0 = a3 >> 4 | a2 << 2,
E1 the same of b) is half g % 2 of word 4 + g // 2. A tile's words are stored
as `b` rows of `N` int32 (word `j` of every column in one row), so `prepared.qweight` has the same shape as
`q_weight` and a thread owning 4 adjacent columns reads each word row with one 16-byte load, coalesced across the
warp, at the native bit width.

Everything here is pure torch and runs on the device its inputs live on: `prepare_exl2` on the GPU is the
production path, and the same code on the CPU is what the bit-exact tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.errors import FormatError
from mixq.exl2.format import Exl2Tensors
from mixq.exl2.pack import pack_scales, unpack_q_weight, unpack_scales

TILE_ROWS = 32
MAX_SEGMENTS = 6  # one per bit width; must match kMaxSegments in csrc/exl2/format.h
WIDTHS = (2, 3, 4, 5, 6, 8)  # EXL2's; 2/4/8 planar, 3/5/6 lane bytes (csrc/exl2/format.h)
_U32 = 0xFFFFFFFF


@dataclass
class PreparedExl2:
    """One EXL2 matrix in the kernels' layout; plain tensors and ints, so ops need no opaque handles.

    `perm[k]` is the input feature that stored row `k` reads; `None` when the caller folded the act-order
    permutation into its input (it then passes `x[..., input_perm]`). Output column `j` is original column
    `col_order[j]` when a column order was folded in (`None`: identity).
    """

    qweight: torch.Tensor  # int32 [sum(rows * b / 32), N], planar tiles
    qscale: torch.Tensor  # int32 [G, N / 8], 4-bit scale codes (column order as qweight)
    scale_max: torch.Tensor  # fp16 [G], fp16(q_scale_max / 256) as exllamav2's loader stores it
    tile_group: torch.Tensor  # int32 [K / 32], group of each 32-row tile
    perm: torch.Tensor | None  # int32 [K]
    input_perm: torch.Tensor  # int32 [K], the act-order permutation (also when folded)
    seg_bits: tuple[int, ...]  # bit width of each contiguous width segment, stored order (<= 6)
    seg_rows: tuple[int, ...]  # rows of each segment (multiples of 32)
    bias: torch.Tensor | None  # fp16 [N]
    col_order: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return sum(self.seg_rows)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def weight_bytes(self) -> int:
        """Bytes a matmul must stream: packed codes, scale codes, per-group maxima and tile map."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qscale, self.scale_max, self.tile_group))


def segments(group_bits: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Merge consecutive groups of one width: (widths, rows). Rejects what the kernels cannot walk."""
    bits: list[int] = []
    rows: list[int] = []
    for b, r in group_bits:
        if b not in WIDTHS:
            raise FormatError(f"q_groups: {b}-bit group; EXL2 has 2, 3, 4, 5, 6 and 8-bit groups only")
        if r <= 0 or r % TILE_ROWS:
            raise FormatError(f"q_groups: a group of {r} rows; mixq's kernels need multiples of {TILE_ROWS}")
        if bits and bits[-1] == b:
            rows[-1] += r
        else:
            bits.append(b)
            rows.append(r)
    if len(bits) > MAX_SEGMENTS:
        raise FormatError(f"q_groups: {len(bits)} width segments (max {MAX_SEGMENTS}); groups must be sorted by width")
    return tuple(bits), tuple(rows)


def _pack3(q: torch.Tensor) -> torch.Tensor:
    """3-bit codes `[T, 32, N]` -> the lane-byte words `[T, 3, N]` (module docstring)."""
    a, b = _pairs(q)

    def low_byte(c: torch.Tensor) -> torch.Tensor:
        return c[:, :, 0] | c[:, :, 1] << 3 | (c[:, :, 2] & 3) << 6

    x, z = low_byte(a), low_byte(b)  # [T, 4, N]
    y = a[:, :, 2] >> 2 | a[:, :, 3] << 1 | b[:, :, 3] << 4 | (b[:, :, 2] >> 2) << 7
    w0 = x[:, 0] | y[:, 0] << 8 | x[:, 1] << 16 | y[:, 1] << 24
    w1 = x[:, 2] | y[:, 2] << 8 | x[:, 3] << 16 | y[:, 3] << 24
    w2 = z[:, 0] | z[:, 1] << 8 | z[:, 2] << 16 | z[:, 3] << 24
    return torch.stack([w0, w1, w2], 1)


def _unpack3(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack3`: words `[T, 3, N]` (uint32 values in int64) -> codes `[T, 32, N]`."""
    xy = torch.stack([w[:, 0], w[:, 0] >> 16, w[:, 1], w[:, 1] >> 16], 1)  # [T, group, N]: X | Y << 8
    x, y = xy & 0xFF, (xy >> 8) & 0xFF
    z = torch.stack([(w[:, 2] >> (8 * g)) & 0xFF for g in range(4)], 1)
    a = [x & 7, (x >> 3) & 7, (x >> 6) | (y & 1) << 2, (y >> 1) & 7]
    b = [z & 7, (z >> 3) & 7, (z >> 6) | (y >> 7) << 2, (y >> 4) & 7]
    return _unpairs(a, b)


def _pairs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `[T, 32, N]` -> (a, b) `[T, group, i, N]`: a_i = row 8g + 2i, b_i = row 8g + 2i + 1."""
    return q[:, 0::2].unflatten(1, (4, 4)), q[:, 1::2].unflatten(1, (4, 4))


def _unpairs(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `_pairs` from the per-i fields `[T, group, N]`: codes `[T, 32, N]` (row 8g + 2i + h)."""
    return torch.stack([torch.stack(a, 2), torch.stack(b, 2)], 3).flatten(1, 3)


def _pack5(q: torch.Tensor) -> torch.Tensor:
    """5-bit codes `[T, 32, N]` -> the lane-byte words `[T, 5, N]` (module docstring)."""
    a, b = _pairs(q)
    low = a[:, :, 0] | a[:, :, 1] << 5 | a[:, :, 2] << 10 | (a[:, :, 3] >> 4) << 15
    high = b[:, :, 0] | b[:, :, 1] << 5 | b[:, :, 2] << 10 | (b[:, :, 3] & 1) << 15
    x = b[:, :, 3] >> 1 | (a[:, :, 3] & 15) << 4  # [T, 4, N]: byte g of word 4
    return torch.cat([low | high << 16, (x << (8 * torch.arange(4, device=q.device)).view(1, 4, 1)).sum(1, True)], 1)


def _unpack5(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack5`: words `[T, 5, N]` (uint32 values in int64) -> codes `[T, 32, N]`."""
    x = torch.stack([(w[:, 4] >> (8 * g)) & 0xFF for g in range(4)], 1)  # [T, group, N]
    lo, hi = w[:, :4] & 0xFFFF, (w[:, :4] >> 16) & 0xFFFF
    a = [lo & 31, (lo >> 5) & 31, (lo >> 10) & 31, x >> 4 | (lo >> 15) << 4]
    b = [hi & 31, (hi >> 5) & 31, (hi >> 10) & 31, hi >> 15 | (x & 15) << 1]
    return _unpairs(a, b)


def _pack6(q: torch.Tensor) -> torch.Tensor:
    """6-bit codes `[T, 32, N]` -> the lane-byte words `[T, 6, N]` (module docstring)."""
    a, b = _pairs(q)

    def half(c: torch.Tensor) -> torch.Tensor:  # A's half of one row of each pair
        return c[:, :, 0] | c[:, :, 1] << 6 | (c[:, :, 3] & 15) << 12

    words = half(a) | half(b) << 16  # [T, 4, N]: word g
    e = (a[:, :, 3] >> 4 | a[:, :, 2] << 2) | (b[:, :, 3] >> 4 | b[:, :, 2] << 2) << 8
    return torch.cat([words, (e[:, 0::2] | e[:, 1::2] << 16)], 1)


def _unpack6(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack6`: words `[T, 6, N]` (uint32 values in int64) -> codes `[T, 32, N]`."""
    e = torch.stack([w[:, 4] & 0xFFFF, w[:, 4] >> 16, w[:, 5] & 0xFFFF, w[:, 5] >> 16], 1)  # [T, group, N]

    def fields(h: int) -> list[torch.Tensor]:
        x, y = (w[:, :4] >> (16 * h)) & 0xFFFF, (e >> (8 * h)) & 0xFF
        return [x & 63, (x >> 6) & 63, y >> 2, (x >> 12) & 15 | (y & 3) << 4]

    return _unpairs(fields(0), fields(1))


_LANE_BYTES = {3: (_pack3, _unpack3), 5: (_pack5, _unpack5), 6: (_pack6, _unpack6)}


def pack_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `[R, N]` (R a multiple of 32, all `bits` wide) -> tile words `[R * bits / 32, N]` int32."""
    R, N = codes.shape
    T = R // TILE_ROWS
    q = codes.to(torch.int64).view(T, TILE_ROWS, N)
    if bits in _LANE_BYTES:
        w = _LANE_BYTES[bits][0](q).view(T * bits, N)
        return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    per = 32 // bits  # planar: code i -> word i // per, bit bits * (i % per)
    shifts = (torch.arange(per, device=q.device, dtype=torch.int64) * bits).view(1, 1, per, 1)
    w = (q.view(T, bits, per, N) << shifts).sum(2).view(T * bits, N)  # disjoint bit fields: sum == OR
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack_tiles(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_tiles`: tile words `[R * bits / 32, N]` -> codes `[R, N]` int32."""
    W, N = words.shape
    T = W // bits
    w = (words.to(torch.int64) & _U32).view(T, bits, N)
    if bits in _LANE_BYTES:
        return _LANE_BYTES[bits][1](w).reshape(T * TILE_ROWS, N).to(torch.int32)
    per = 32 // bits
    shifts = (torch.arange(per, device=words.device, dtype=torch.int64) * bits).view(1, 1, per, 1)
    q = (w.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # [T, bits, per, N]
    return q.reshape(T * TILE_ROWS, N).to(torch.int32)


def repack_codes(codes: torch.Tensor, seg_bits: tuple[int, ...], seg_rows: tuple[int, ...]) -> torch.Tensor:
    """Codes `[K, N]` in stored row order -> the kernels' `qweight`."""
    out, row = [], 0
    for b, r in zip(seg_bits, seg_rows):
        out.append(pack_tiles(codes[row : row + r], b))
        row += r
    return torch.cat(out)


def unpack_prepared(qweight: torch.Tensor, seg_bits: tuple[int, ...], seg_rows: tuple[int, ...]) -> torch.Tensor:
    """The kernels' `qweight` -> codes `[K, N]` int32 in stored row order."""
    out, wrow = [], 0
    for b, r in zip(seg_bits, seg_rows):
        n = r * b // 32
        out.append(unpack_tiles(qweight[wrow : wrow + n], b))
        wrow += n
    return torch.cat(out)


def tile_groups(group_bits: list[tuple[int, int]], device: torch.device | str | None = None) -> torch.Tensor:
    counts = torch.tensor([r // TILE_ROWS for _, r in group_bits], device=device)
    return torch.repeat_interleave(torch.arange(len(group_bits), device=device), counts).to(torch.int32)


# Bytes of int64 scratch (unpacked codes, packing temporaries: ~24 per weight) one slice of columns may take while a
# matrix is repacked. Every step works on columns independently, so a wide matrix goes a slice at a time: whole, one
# 14336 x 4096 expert matrix needed ~1.4 GB of scratch (counted from the tensor sizes) on the GPU at load.
_SCRATCH_BYTES = 1 << 27


def _repacked(qw: torch.Tensor, group_bits, seg_bits, seg_rows, col_order: torch.Tensor | None) -> torch.Tensor:
    """`q_weight` -> the kernels' `qweight` (same shape), output column j from source column col_order[j]."""
    out = torch.empty_like(qw)
    N, K = qw.shape[1], max(sum(seg_rows), 1)
    step = max(1, _SCRATCH_BYTES // (24 * K))
    for j in range(0, N, step):
        src = qw[:, j : j + step] if col_order is None else qw.index_select(1, col_order[j : j + step])
        out[:, j : j + step] = repack_codes(unpack_q_weight(src, group_bits), seg_bits, seg_rows)
    return out


def prepare_exl2(
    t: Exl2Tensors,
    device: torch.device | str | None = None,
    *,
    fold_perm: bool = False,
    col_order: torch.Tensor | None = None,
) -> PreparedExl2:
    """Repack one EXL2 matrix for the kernels (on `device`, default: where `t` lives).

    fold_perm: the caller feeds inputs already in stored order (`x[..., prepared.input_perm]`), e.g. once per
    MoE layer for all experts sharing w1/w3's permutation; the kernels then read x without a gather.
    col_order: output column `j` becomes original column `col_order[j]` (used to fold the next matrix's
    act-order permutation into this one's outputs).
    """
    dev = torch.device(device) if device is not None else t.q_weight.device
    seg_bits, seg_rows = segments(t.group_bits)
    N = t.out_features
    scodes = unpack_scales(t.q_scale.to(dev), N)
    bias = None if t.bias is None else t.bias.to(dev, torch.float16)
    if col_order is not None:
        col_order = col_order.to(dev, torch.int64)
        if col_order.shape != (N,) or not torch.equal(torch.sort(col_order).values, torch.arange(N, device=dev)):
            raise FormatError(f"col_order: must be a permutation of the {N} output columns")
        scodes = scodes[:, col_order]
        bias = None if bias is None else bias[col_order]
    input_perm = torch.argsort(t.q_invperm.to(dev).long()).to(torch.int32)
    return PreparedExl2(
        qweight=_repacked(t.q_weight.to(dev), t.group_bits, seg_bits, seg_rows, col_order),
        qscale=pack_scales(scodes).contiguous(),
        scale_max=(t.q_scale_max.to(dev).float() * (1.0 / 256)).half(),
        tile_group=tile_groups(t.group_bits, dev),
        perm=None if fold_perm else input_perm,
        input_perm=input_perm,
        seg_bits=seg_bits,
        seg_rows=seg_rows,
        bias=bias,
        col_order=col_order,
    )
