"""The half2 dequantization helpers (csrc/exl2/dequant_half2.cuh) and the emulated instructions they need
(__hfma2, __byte_perm in tools/cuda_emu/emu.h; lop3, the inline PTX of csrc/common/ptx.cuh, in
tools/cuda_emu/ptx.cuh), one at a time against plain torch, bit for bit.

They run through test-only ops (torch.ops.mixq_emu, tools/cuda_emu/test_ops.cpp) that only the CPU emulation
build has: skipped elsewhere (on a GPU the gemm tests cover the same helpers through the kernels).
"""

import pytest
import torch

from mixq.exl2.layout import unpack_tiles
from mixq.kernels import ops

pytestmark = pytest.mark.kernels

WIDTHS = (2, 3, 4, 5, 6, 8)


def _emu():
    if not ops.emulated():
        pytest.skip("test-only ops exist in the CPU emulation build only (MIXQ_CUDA_EMU)")
    return torch.ops.mixq_emu


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


def _random_words(shape, g) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)


def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def planar_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [n, 32] of n column tiles from their words [n, bits] (the layout's definition, mixq/exl2/layout.py)."""
    return unpack_tiles(words.reshape(-1, 1), bits).to(torch.int64).view(-1, 32)


def slots(bits: int) -> torch.Tensor:
    """Where row r of a tile goes in the pair order: each block of P = 32 / bits rows (one planar word) pairs row m
    with row m + P/2 as (low, high) half, pairs in order of m; 3-, 5- and 6-bit tiles pair rows (2p, 2p + 1)
    (P = 2)."""
    period = 2 if bits in (3, 5, 6) else 32 // bits
    r = torch.arange(32)
    m = r % period
    return (r - m) + 2 * (m % (period // 2)) + m // (period // 2)


@pytest.mark.parametrize("bits", WIDTHS)
def test_dequant_pairs_bit_exact(bits):
    emu = _emu()
    words = _random_words((4096, bits), _gen())
    got = emu.dequant_half2(words, bits)
    want = torch.empty(4096, 32, dtype=torch.float16)
    want[:, slots(bits)] = ((planar_codes(words, bits) - (1 << (bits - 1))).double() / (1 << (bits - 1))).half()
    assert torch.equal(emu.tile_x_slots(bits), slots(bits))
    mismatch = (got.view(torch.int16) != want.view(torch.int16)).nonzero()
    assert mismatch.numel() == 0, f"{bits}-bit: {len(mismatch)} codes differ, first (tile, slot) {mismatch[0].tolist()}"


@pytest.mark.parametrize("bits", WIDTHS)
def test_tile_scales_as_reference(bits):
    emu = _emu()
    g = _gen()
    n = 4096
    codes = torch.randint(0, 1 << 16, (n,), generator=g, dtype=torch.int32)
    # scale_max over a wide range of magnitudes, fp16 subnormals included
    smax = (torch.rand(n, generator=g) * 2.0 ** torch.randint(-20, 4, (n,), generator=g)).half()
    got = emu.tile_scales(codes, smax, bits)
    c = (codes.unsqueeze(1).to(torch.int64) >> (4 * torch.arange(4))) & 15
    want = ((c + 1).square().half().float() * smax.float().unsqueeze(1)).half().float() * (1 << (bits - 1))
    assert torch.equal(got, want)


def round_to_half(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of float64 values to fp16 (finite range), without torch's double -> half cast, which
    goes through fp32 and so rounds twice."""
    _, e = torch.frexp(x)  # x = f * 2^e, 0.5 <= |f| < 1
    ulp = torch.ldexp(torch.ones_like(x), (e - 11).clamp_min(-24))  # fp16: 11 significant bits, subnormals 2^-24
    return (torch.round(x / ulp) * ulp).half()  # torch.round: half to even; exact scaling by powers of two


def test_emulated_hfma2_rounds_once():
    emu = _emu()
    g = _gen()
    n = 1 << 16

    def halves(lo, hi):  # random signs, exponents in [lo, hi]: a * b + c is exact in float64
        m = 1 + torch.randint(0, 1024, (n,), generator=g) / 1024
        s = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        return (s * m * 2.0 ** torch.randint(lo, hi + 1, (n,), generator=g)).half()

    a, b, c = halves(-6, 6), halves(-6, 6), halves(-12, 12)
    # Ties after a first rounding to fp32: a * b on an fp16 midpoint (1025 * 3 = 3075, between 3074 and 3076)
    # and c far below fp32's precision there, which decides the direction.
    a = torch.cat([a, torch.tensor([1025.0, 1025.0, 1025.0, -1025.0]).half()])
    b = torch.cat([b, torch.tensor([3.0, 3.0, 3.0, 3.0]).half()])
    c = torch.cat([c, torch.tensor([-(2.0**-14), 2.0**-14, 0.0, 2.0**-14]).half()])
    got = emu.hfma2(a, b, c)
    want = round_to_half(a.double() * b.double() + c.double())
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert got[-4:].tolist() == [3074.0, 3076.0, 3076.0, -3074.0]


def test_emulated_byte_perm():
    emu = _emu()
    g = _gen()
    n = 1 << 14
    x, y = _random_words((n,), g), _random_words((n,), g)
    s = torch.randint(0, 1 << 16, (n,), generator=g, dtype=torch.int32)
    src = _u32(y) << 32 | _u32(x)
    want = torch.zeros(n, dtype=torch.int64)
    for k in range(4):
        sel = (s.to(torch.int64) >> (4 * k)) & 15
        byte = (src >> (8 * (sel & 7))) & 0xFF
        byte = torch.where(sel >= 8, torch.where(byte >= 0x80, 0xFF, 0), byte)  # msb of the nibble: sign mode
        want |= byte << (8 * k)
    assert torch.equal(_u32(emu.byte_perm(x, y, s)), want)


def test_emulated_lop3():
    emu = _emu()
    g = _gen()
    n = 1 << 12
    a, b, c = (_random_words((n,), g) for _ in range(3))
    bit = torch.arange(32)
    a_i, b_i, c_i = ((_u32(v).unsqueeze(1) >> bit) & 1 for v in (a, b, c))  # [n, 32] bits
    idx = a_i << 2 | b_i << 1 | c_i
    for lut in [0xEA, 0x96, 0xE4, 0xF8, 0x01, 0x80, *torch.randint(0, 256, (16,), generator=g).tolist()]:
        want = (((lut >> idx) & 1) << bit).sum(1)  # the truth table entry of each bit's (a, b, c)
        assert torch.equal(_u32(emu.lop3(a, b, c, lut)), want), f"lut {lut:#04x}"
