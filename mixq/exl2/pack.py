"""EXL2 on-disk bit layouts: `q_weight`, `q_scale` and `q_groups` (section 3 of docs/exl2-format.md).

`q_weight`: for each output column independently, the stored rows of one group form an LSB-first,
little-endian bit stream of 32-bit words (value `i` at bits `b*i .. b*i+b-1`; word 0 holds bits 0-31).
exllamav2 describes it as units of 16/32/8/32/16/4 values in 1/3/1/5/3/1 words for 2/3/4/5/6/8 bits;
a group is a whole number of units, so a group (and a run of same-width groups) is one continuous stream.
This is the plain layout files hold; the GPU shuffle of exllamav2 is a runtime concern and not done here.

All functions are pure torch and run on whatever device their inputs live on.
"""

from __future__ import annotations

import math

import torch

from mixq.errors import FormatError

_U32 = 0xFFFFFFFF


def unit_size(bits: int) -> tuple[int, int]:
    """(values, int32 words) of one packing unit: the smallest run of values that fills whole words."""
    values = 32 // math.gcd(bits, 32)
    return values, values * bits // 32


def _runs(group_bits: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Merge consecutive groups of equal width: (bits, first row, rows)."""
    runs: list[list[int]] = []
    row = 0
    for bits, rows in group_bits:
        if bits not in (2, 3, 4, 5, 6, 8):
            raise FormatError(f"q_weight: {bits}-bit group; EXL2 has 2, 3, 4, 5, 6 and 8-bit groups only")
        if rows <= 0 or rows * bits % 32:
            raise FormatError(f"q_weight: a {bits}-bit group of {rows} rows does not fill whole 32-bit words")
        if runs and runs[-1][0] == bits:
            runs[-1][2] += rows
        else:
            runs.append([bits, row, rows])
        row += rows
    return [tuple(r) for r in runs]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same 32 bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def packed_rows(group_bits: list[tuple[int, int]]) -> int:
    return sum(rows * bits // 32 for bits, rows in group_bits)


def pack_q_weight(q: torch.Tensor, group_bits: list[tuple[int, int]]) -> torch.Tensor:
    """Pack unsigned codes `q[K, N]` (stored row order) into `q_weight[sum(rows*bits/32), N]` int32."""
    q = torch.as_tensor(q)
    K, N = q.shape
    runs = _runs(group_bits)
    if sum(r[2] for r in runs) != K:
        raise FormatError(f"q_weight: groups cover {sum(r[2] for r in runs)} rows but q has {K}")
    out = []
    for bits, row0, rows in runs:
        seg = q[row0 : row0 + rows].to(torch.int64)
        if seg.numel() and (seg.min() < 0 or seg.max() >= 1 << bits):
            raise FormatError(f"q_weight: codes of a {bits}-bit group must lie in 0..{(1 << bits) - 1}")
        u, w = unit_size(bits)
        seg = seg.view(rows // u, u, N)
        words = torch.zeros(rows // u, w, N, dtype=torch.int64, device=q.device)
        for i in range(u):  # one strided slice per position in the unit: same word and shift for all units
            wi, shift = divmod(bits * i, 32)
            v = seg[:, i] << shift
            words[:, wi] |= v & _U32
            if shift + bits > 32:  # the value straddles into the next word
                words[:, wi + 1] |= v >> 32
        out.append(words.view(rows // u * w, N))
    return _to_int32(torch.cat(out)) if out else torch.zeros(0, N, dtype=torch.int32, device=q.device)


def unpack_q_weight(q_weight: torch.Tensor, group_bits: list[tuple[int, int]]) -> torch.Tensor:
    """Inverse of `pack_q_weight`: `q_weight` int32 -> unsigned codes `[K, N]` int32 in stored row order."""
    runs = _runs(group_bits)
    if packed_rows(group_bits) != q_weight.shape[0]:
        raise FormatError(f"q_weight: groups need {packed_rows(group_bits)} packed rows but it has {q_weight.shape[0]}")
    N = q_weight.shape[1]
    words_all = q_weight.to(torch.int64) & _U32
    out, qrow = [], 0
    for bits, _, rows in runs:
        u, w = unit_size(bits)
        n_words = rows * bits // 32
        words = words_all[qrow : qrow + n_words].view(rows // u, w, N)
        qrow += n_words
        vals = torch.empty(rows // u, u, N, dtype=torch.int64, device=q_weight.device)
        mask = (1 << bits) - 1
        for i in range(u):
            wi, shift = divmod(bits * i, 32)
            v = words[:, wi] >> shift
            if shift + bits > 32:
                v = v | (words[:, wi + 1] << (32 - shift))
            vals[:, i] = v & mask
        out.append(vals.view(rows, N))
    if not out:
        return torch.zeros(0, N, dtype=torch.int32, device=q_weight.device)
    return torch.cat(out).to(torch.int32)


def pack_scales(codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes `[G, N]` (0..15) -> `q_scale[G, N/8]` int32; column `8c+i` at bits `4i..4i+3`."""
    codes = torch.as_tensor(codes)
    G, N = codes.shape
    if N % 8:
        raise FormatError(f"q_scale: {N} columns is not a multiple of 8")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() > 15):
        raise FormatError("q_scale: scale codes must lie in 0..15")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=c.device)
    return _to_int32((c.view(G, N // 8, 8) << shifts).sum(-1))


def unpack_scales(q_scale: torch.Tensor, N: int) -> torch.Tensor:
    """`q_scale[G, N/8]` int32 -> scale codes `[G, N]` int32 (0..15)."""
    G = q_scale.shape[0]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q_scale.device)
    codes = ((q_scale.to(torch.int64) & _U32).unsqueeze(-1) >> shifts) & 15
    return codes.view(G, -1)[:, :N].to(torch.int32)


def make_q_groups(group_bits: list[tuple[int, int]], device: torch.device | str | None = None) -> torch.Tensor:
    """`q_groups` int16 `[2G]`: (bits, first q_weight row) per group."""
    flat, start = [], 0
    for bits, rows in group_bits:
        flat += [bits, start]
        start += rows * bits // 32
    if start > 32767:
        raise FormatError(f"q_groups: {start} packed rows overflow int16 group offsets; split the matrix")
    return torch.tensor(flat, dtype=torch.int16, device=device)
