"""The kernels' EXL2 layout (mixq/exl2/layout.py): bit-exact, CPU only."""

import pytest
import torch

from mixq.errors import FormatError
from mixq.exl2.layout import pack_tiles, prepare_exl2, repack_codes, segments, unpack_prepared, unpack_tiles
from mixq.exl2.pack import unpack_q_weight
from mixq.exl2.qparams import QPARAMS_MLP, parse_recipe
from mixq.exl2.reference import dequantize, dequantize_stored
from mixq.kernels.ops import exl2_dequant_ref, exl2_matmul_ref
from mixq.synthetic.exl2_layer import random_exl2

WIDTHS = (2, 3, 4, 5, 6, 8)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


@pytest.mark.parametrize("bits", WIDTHS)
def test_tiles_roundtrip(bits):
    """The device reads these words with exl2/dequant_half2.cuh's decoder: tested against them bit for bit under the
    emulation (tests/test_dequant_half2.py) and through every kernel."""
    g = _gen()
    R, N = 96, 40
    q = torch.randint(0, 1 << bits, (R, N), generator=g, dtype=torch.int32)
    words = pack_tiles(q, bits)
    assert words.shape == (R * bits // 32, N) and words.dtype == torch.int32
    assert torch.equal(unpack_tiles(words, bits), q)


@pytest.mark.parametrize("bits", WIDTHS)
def test_tiles_are_a_bit_permutation(bits):
    """Every code bit lands in exactly one word bit: flipping one code bit flips one word bit."""
    g = _gen()
    q = torch.randint(0, 1 << bits, (32, 8), generator=g, dtype=torch.int32)
    base = pack_tiles(q, bits).to(torch.int64) & 0xFFFFFFFF
    i, n, b = (int(torch.randint(0, m, (1,), generator=g)) for m in (32, 8, bits))
    q2 = q.clone()
    q2[i, n] ^= 1 << b
    diff = (pack_tiles(q2, bits).to(torch.int64) & 0xFFFFFFFF) ^ base
    assert int(sum(bin(int(v)).count("1") for v in diff.flatten())) == 1


RECIPES = [f"{b}b_32g" for b in WIDTHS] + sorted({str(r[p]) for r in QPARAMS_MLP for p in ("w1", "w3", "w2")})


@pytest.mark.parametrize("recipe", RECIPES)
def test_prepare_is_lossless(recipe):
    g = _gen()
    K, N = 512, 64
    t = random_exl2(K, N, parse_recipe(recipe), generator=g, bias=bool(torch.randint(0, 2, (1,), generator=g)))
    p = prepare_exl2(t)
    assert p.qweight.shape == t.q_weight.shape
    assert torch.equal(unpack_prepared(p.qweight, p.seg_bits, p.seg_rows), unpack_q_weight(t.q_weight, t.group_bits))
    assert torch.equal(p.qscale, t.q_scale)
    assert p.in_features == K and p.out_features == N
    assert p.tile_group.numel() == K // 32 and int(p.tile_group[-1]) == len(t.groups) - 1
    assert list(p.seg_bits) == sorted(set(p.seg_bits), reverse=True)
    # the kernels' dequantization twin equals the EXL2 reference bit for bit
    assert torch.equal(exl2_dequant_ref(p).view(torch.int16), dequantize(t).view(torch.int16))


def test_prepare_folds_perm_and_columns():
    g = _gen()
    K, N = 256, 96
    t = random_exl2(K, N, parse_recipe("0.1:8b_32g/0.2:4b_64g/0.7:3b_32g"), generator=g, bias=True)
    order = torch.randperm(N, generator=g)
    p = prepare_exl2(t, fold_perm=True, col_order=order)
    assert p.perm is None
    assert torch.equal(exl2_dequant_ref(p).view(torch.int16), dequantize_stored(t)[:, order].view(torch.int16))
    x = torch.randn(3, K, generator=g, dtype=torch.float64).half()
    y = exl2_matmul_ref(x[:, p.input_perm.long()], p)
    y_ref = (x.double() @ dequantize(t).double() + t.bias.double())[:, order]
    assert torch.allclose(y.double(), y_ref, rtol=2e-3, atol=2e-3)


def test_segments_reject_unsorted_and_odd_groups():
    assert segments([(8, 32), (4, 128), (4, 64)]) == ((8, 4), (32, 192))
    with pytest.raises(FormatError):
        segments([(4, 48)])
    with pytest.raises(FormatError):
        segments([(8, 32), (6, 32), (8, 32), (6, 32), (8, 32), (6, 32), (8, 32)])
    with pytest.raises(FormatError):
        prepare_exl2(random_exl2(64, 32, parse_recipe("4b_32g")), col_order=torch.zeros(32, dtype=torch.long))


@pytest.mark.parametrize("fold_columns", [False, True])
def test_prepare_in_column_slices_is_the_same(monkeypatch, fold_columns):
    """A wide matrix is repacked a slice of columns at a time (bounded scratch on the GPU at load): slices of 1..N
    columns, with and without a column order, give the words of the whole-matrix repack."""
    from mixq.exl2 import layout

    g = _gen()
    K, N = 256, 64
    t = random_exl2(K, N, parse_recipe("0.2:6b_32g/0.3:5b_32g/0.5:3b_32g"), generator=g, bias=False)
    order = torch.randperm(N, generator=g) if fold_columns else None
    codes = unpack_q_weight(t.q_weight, t.group_bits)
    want = repack_codes(codes if order is None else codes[:, order], *segments(t.group_bits))
    for cols in (1, 3, int(torch.randint(2, N, (1,), generator=g)), N):
        monkeypatch.setattr(layout, "_SCRATCH_BYTES", 24 * K * cols)
        got = prepare_exl2(t, col_order=order).qweight
        assert torch.equal(got, want), cols

