"""q_weight / q_scale / q_groups layouts: hand-packed fixtures from the spec (section 3.3) and round trips."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.exl2.pack import make_q_groups, pack_q_weight, pack_scales, unpack_q_weight, unpack_scales
from mixq.exl2.qparams import QParams, parse_recipe

# Hand-worked fixtures: one 32-row group, one column. `vals` sets a few stored rows (others 0);
# `words` are the expected q_weight words as unsigned 32-bit, worked out by hand from the LSB-first stream.
FIXTURES = {
    # 2-bit: 16 values per word. rows 0,1,2 = 1,2,3 -> 0b11_10_01 = 0x39; row 15 = 3 -> bits 30-31; row 16 = 2.
    2: ({0: 1, 1: 2, 2: 3, 15: 3, 16: 2}, [0xC0000039, 0x00000002]),
    # 3-bit: 32 values in 3 words. row 0 = 3; row 10 = 7 straddles bits 30-32; row 21 = 0b101 straddles 63-65
    # (bit 63 = 1, bit 64 = 0, bit 65 = 1); row 31 = 0b100 -> bit 95.
    3: ({0: 3, 10: 7, 21: 5, 31: 4}, [0xC0000003, 0x80000001, 0x80000002]),
    # 4-bit: 8 nibbles per word, row 0 in the low nibble; row 31 = 15 -> top nibble of word 3.
    4: ({0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8, 31: 15}, [0x87654321, 0, 0, 0xF0000000]),
    # 5-bit: 32 values in 5 words. row 0 = 1; row 6 = 31 at bits 30-34; row 25 = 0b10110 at bits 125-129.
    5: ({0: 1, 6: 31, 25: 22}, [0xC0000001, 0x00000007, 0, 0xC0000000, 0x00000002]),
    # 6-bit: 16 values in 3 words. row 1 = 63 -> bits 6-11; row 5 = 0b100111 at bits 30-35;
    # row 10 = 0b110001 at bits 60-65; row 16 (next unit) = 1 -> word 3.
    6: ({1: 63, 5: 39, 10: 49, 16: 1}, [0xC0000FC0, 0x10000009, 0x00000003, 0x00000001, 0, 0]),
    # 8-bit: 4 bytes per word, little-endian.
    8: ({0: 0x11, 1: 0x22, 2: 0x33, 3: 0xFF, 4: 0x80}, [0xFF332211, 0x00000080] + [0] * 6),
}


@pytest.mark.parametrize("bits", sorted(FIXTURES))
def test_hand_packed_fixture(bits):
    vals, words = FIXTURES[bits]
    q = torch.zeros(32, 1, dtype=torch.int32)
    for row, v in vals.items():
        q[row, 0] = v
    packed = pack_q_weight(q, [(bits, 32)])
    assert packed.dtype == torch.int32 and packed.shape == (32 * bits // 32, 1)
    assert [w & 0xFFFFFFFF for w in packed[:, 0].tolist()] == words
    assert torch.equal(unpack_q_weight(packed, [(bits, 32)]), q)


def test_hand_packed_scales_and_groups():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 10]])
    packed = pack_scales(codes)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert [w & 0xFFFFFFFF for w in packed[0].tolist()] == [0x87654321, 0xA000000F]
    assert torch.equal(unpack_scales(packed, 16), codes.int())
    # spec 2.2 example: 23 x 8-bit/32 rows (8 words each), 12 x 4-bit/128 (16 words), 95 x 3-bit (12 words, the last 3)
    gb = parse_recipe("0.05:8b_32g/0.1:4b_128g/0.85:3b_128g").groups(14336)
    qg = make_q_groups(gb)
    assert qg.dtype == torch.int16 and qg.shape == (260,)
    assert qg[:6].tolist() == [8, 0, 8, 8, 8, 16]
    assert qg[44:50].tolist() == [8, 176, 4, 184, 4, 200]
    assert qg[68:74].tolist() == [4, 360, 3, 376, 3, 388]
    assert qg[-2:].tolist() == [3, 1504]


def test_pack_bits_match_a_bit_by_bit_model():
    """Every value of a random mixed matrix sits at bits b*i.. of its group's stream (a slow independent model)."""
    gb = [(8, 32), (6, 64), (5, 32), (3, 64), (2, 32)]
    K = sum(r for _, r in gb)
    q = torch.cat([torch.randint(0, 1 << b, (r, 3), dtype=torch.int32) for b, r in gb])
    packed = pack_q_weight(q, gb)
    words = [[w & 0xFFFFFFFF for w in packed[:, c].tolist()] for c in range(3)]
    row, qrow = 0, 0
    for b, r in gb:
        for i in range(r):
            for c in range(3):
                v = 0
                for j in range(b):
                    pos = b * i + j
                    v |= ((words[c][qrow + pos // 32] >> (pos % 32)) & 1) << j
                assert v == q[row + i, c], (b, i, c)
        row += r
        qrow += r * b // 32
    assert row == K and qrow == packed.shape[0]


@st.composite
def mixes(draw):
    widths = sorted(draw(st.lists(st.sampled_from([8, 6, 5, 4, 3, 2]), min_size=1, max_size=3, unique=True)))[::-1]
    gs = {b: draw(st.sampled_from([32, 64, 128])) for b in widths}
    cuts = sorted(draw(st.lists(st.floats(0.01, 0.99), min_size=len(widths) - 1, max_size=len(widths) - 1)))
    props = [b - a for a, b in zip([0.0] + cuts, cuts + [1.0])]
    K = 32 * draw(st.integers(1, 24))
    N = 32 * draw(st.integers(1, 3))
    return QParams(widths, props, gs), K, N


@settings(max_examples=60, deadline=None)
@given(mixes())
def test_roundtrip_random_mixes(case):
    qp, K, N = case
    gb = qp.groups(K)
    q = torch.cat([torch.randint(0, 1 << b, (r, N), dtype=torch.int32) for b, r in gb])
    packed = pack_q_weight(q, gb)
    assert packed.shape == (sum(r * b // 32 for b, r in gb), N)
    assert torch.equal(unpack_q_weight(packed, gb), q)
    codes = torch.randint(0, 16, (len(gb), N))
    assert torch.equal(unpack_scales(pack_scales(codes), N), codes.int())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_roundtrip_each_width_extremes(bits):
    K = 32 * random.randint(1, 8)
    q = torch.randint(0, 1 << bits, (K, 64), dtype=torch.int32)
    q[0] = (1 << bits) - 1  # all ones exercises the sign bit of every word
    q[-1] = 0
    gb = [(bits, 32)] * (K // 32)
    assert torch.equal(unpack_q_weight(pack_q_weight(q, gb), gb), q)


def test_three_width_matrix_different_group_sizes_full_size_is_fast():
    import time

    gb = parse_recipe("0.05:8b_32g/0.1:4b_128g/0.85:3b_128g").groups(14336)
    q = torch.cat([torch.randint(0, 1 << b, (r, 4096), dtype=torch.int32) for b, r in gb])
    t = time.perf_counter()
    packed = pack_q_weight(q, gb)
    assert torch.equal(unpack_q_weight(packed, gb), q)
    assert packed.shape == (1507, 4096)
    assert time.perf_counter() - t < 30


def test_pack_rejects_out_of_range_codes():
    from mixq.errors import FormatError

    with pytest.raises(FormatError, match="0..15"):
        pack_q_weight(torch.full((32, 4), 16), [(4, 32)])
    with pytest.raises(FormatError, match="whole 32-bit words"):
        pack_q_weight(torch.zeros(16, 4), [(3, 16)])
