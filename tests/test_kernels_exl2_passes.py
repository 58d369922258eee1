"""exl2_gemm in passes: the split-K partial buffer (splits * rows * N fp32) is capped (64 MB by default) by running
M in passes of whole 8-token chunks. The cap is an op argument, so a small matrix here takes several passes; the
passes must give exactly the single-pass result (forced splits: the same plan per row) and the reference's.
On a GPU with mixq._C or under the CPU emulation (poisoned allocations, ASan in CI)."""

import math

import pytest
import torch
from kernel_env import DEV, poison_allocator, sync

from mixq.exl2.layout import prepare_exl2
from mixq.exl2.qparams import parse_recipe
from mixq.exl2.reference import dequantize
from mixq.kernels import ops
from mixq.synthetic.exl2_layer import random_exl2

pytestmark = pytest.mark.kernels

TOL = 1.5e-3  # as tests/test_kernels_exl2.py, against an fp64 product


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


def _reference(x: torch.Tensor, t) -> torch.Tensor:
    y = x.double() @ dequantize(t.to(DEV)).double()
    return y + t.bias.double().to(DEV) if t.bias is not None else y


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _gemm(x, p, splits, cap):
    poison_allocator()  # the emulation poisons every op allocation itself
    y = ops.exl2_gemm(x, p, splits=splits, max_partial_bytes=cap)
    sync()
    assert y.shape == (x.shape[0], p.out_features) and torch.isfinite(y).all(), "unwritten (NaN) rows"
    return y


@pytest.mark.parametrize(
    "recipe,splits,cap_rows,m",
    [
        # one 4-bit segment of 32 tiles, 4 forced splits: 4 partial planes, a cap of 16 rows' worth -> 16, 16, 5
        ("4b_32g", 4, 16, 37),
        ("4b_32g", 4, 16, 48),  # no short tail: 16, 16, 16
        # mixed widths (splits per segment), a cap below one chunk: the 8-row floor -> 8, 8, 8, 8, 3
        ("0.1:8b_32g/0.2:6b_64g/0.3:5b_32g/0.4:3b_32g", 3, 0, 35),
        ("0.05:8b_32g/0.95:4b_128g", 0, 0, 29),  # automatic splits
    ],
)
def test_passes_equal_single_pass_and_reference(recipe, splits, cap_rows, m):
    g = _gen()
    K, N = 1024, 256
    t = random_exl2(K, N, parse_recipe(recipe), generator=g, bias=True)
    p = prepare_exl2(t, DEV)
    # cap_rows rows of `splits` planes fit exactly (one segment: the plan has exactly `splits` splits); 0: 1 byte.
    cap = splits * cap_rows * N * 4 if cap_rows else 1
    rows = ops.exl2_gemm_pass_rows(p, m, splits, cap)
    passes = math.ceil(m / rows)
    assert passes >= 3 and (cap_rows == 0 or rows == cap_rows), (rows, passes)
    assert ops.exl2_gemm_pass_rows(p, m, splits) == m  # the default cap: one pass at this size

    x = torch.randn(m, K, generator=g).half().to(DEV)
    one = _gemm(x, p, splits, 0)
    several = _gemm(x, p, splits, cap)
    ref = _reference(x, t)
    assert _rel_err(several, ref) <= TOL and _rel_err(one, ref) <= TOL
    if splits:  # forced splits: every row sees the same plan, so the passes change nothing, bit for bit
        assert torch.equal(several.view(torch.int16), one.view(torch.int16))
    # each pass's rows are its own (a pass that wrote another's rows, or none, differs from the reference there)
    for r0 in range(0, m, rows):
        sl = slice(r0, min(m, r0 + rows))
        assert _rel_err(several[sl], ref[sl]) <= TOL, f"pass at row {r0}"


@pytest.mark.parametrize("m", [1, 8, 9, 16, 17, 100, 1000, 4099])
def test_pass_rows_arithmetic(m):
    """The rows per pass for one width segment and forced splits (so `splits` partial planes at any row count):
    one pass when M fits; otherwise whole 8-token chunks, the full and the last pass within the cap (or one chunk),
    and no smaller than halving needs (more than half the rows that fit)."""
    g = _gen()
    tiles = int(torch.randint(2, 64, (1,), generator=g))
    splits = [d for d in range(1, tiles + 1) if tiles % d == 0 and tiles // d <= 32]  # exact: tiles_per_split <= 32
    s = splits[int(torch.randint(len(splits), (1,), generator=g))]
    N = 32 * int(torch.randint(1, 200, (1,), generator=g))
    p = prepare_exl2(random_exl2(32 * tiles, N, parse_recipe("4b_32g"), generator=g), DEV)
    plane = s * N * 4  # partial bytes per row
    assert ops.exl2_gemm_pass_rows(p, m, s, plane * m) == m
    assert ops.exl2_gemm_pass_rows(p, m, s) == ops.exl2_gemm_pass_rows(p, m, s, 64 << 20)  # 0: the 64 MB default
    for fit in sorted({1, 8, 9, 15, 16, 24, 40, max(1, m // 3), max(1, m - 1)}):
        cap = plane * fit
        rows = ops.exl2_gemm_pass_rows(p, m, s, cap)
        if s == 1 or m <= 8 or fit >= m:
            assert rows == m, (s, fit, rows)
            continue
        assert 8 <= rows < m and rows % 8 == 0, (fit, rows)
        assert rows <= max(fit, 8) and (m % rows <= max(fit, 8)), (fit, rows)
        assert 2 * rows > min(fit, m), f"passes of {rows} rows where {fit} fit"


def test_bad_cap_refused():
    g = _gen()
    t = random_exl2(256, 64, parse_recipe("4b_32g"), generator=g)
    p = prepare_exl2(t, DEV)
    x = torch.randn(3, 256, generator=g).half().to(DEV)
    with pytest.raises(RuntimeError, match="max_partial_bytes must be >= 0"):
        ops.exl2_gemm(x, p, max_partial_bytes=-1)
