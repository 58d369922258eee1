"""EXL2 kernels vs the PyTorch reference (on a GPU with mixq._C, or the CPU kernel emulation; skipped otherwise).

Tolerance: rel. Frobenius error <= 1e-3 against an fp64 product of the reference dequantized weights. The
kernel accumulates in fp32 and uses exact (q - z) * scale weights, the reference rounds weights to fp16, so
the expected error is ~1e-4; 1e-3 leaves room for fp32 accumulation over K = 14336 and the fp16 output.
"""

import pytest
import torch
from kernel_env import DEV, full_size, poison_allocator, sync

from mixq.exl2.layout import prepare_exl2
from mixq.exl2.qparams import QPARAMS_MLP, parse_recipe
from mixq.exl2.reference import dequantize
from mixq.kernels import ops
from mixq.synthetic.exl2_layer import random_exl2

pytestmark = pytest.mark.kernels

# The fused kernel sums in fp32 (csrc/exl2/gemm_tiles.cuh): what is left is the fp16 rounding of its outputs,
# 2.5-3.2e-4 measured under the emulation (its fp16 partial sums before: ~6.4e-4, 1.04e-3 on a single-tile draw);
# the bound also covers the dequantize + matmul path. Any indexing or dequant bug gives errors near 1.
TOL = 1.5e-3
# 520: a prefill of 65 token chunks (1000 took 304 s of CI's emulated run under ASan; the chunks are independent)
TOKENS = [1, 2, 3, 4, 7, 8, 9, 16, 17, 32, 33, 64, 520]
WIDTHS = (2, 3, 4, 5, 6, 8)
SINGLE = [f"{b}b_32g" for b in WIDTHS] + [f"{b}b_128g" for b in WIDTHS]
MIXES = sorted({str(r[p]) for r in QPARAMS_MLP for p in ("w1", "w3", "w2")})


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def reference(x: torch.Tensor, t) -> torch.Tensor:
    w = dequantize(t.to(DEV)).double()
    y = x.double() @ w
    return y + t.bias.double().to(DEV) if t.bias is not None else y


def check(x, p, t, splits=0, x_kernel=None):
    poison_allocator()
    y = ops.exl2_gemm(x if x_kernel is None else x_kernel, p, splits=splits)
    sync()
    assert y.shape == (*x.shape[:-1], p.out_features) and y.dtype == torch.float16
    assert torch.isfinite(y).all(), "unwritten (NaN) or overflowing outputs"
    err = rel_err(y, reference(x, t))
    assert err <= TOL, f"rel err {err:.2e}"


def make(K, N, recipe, g, bias=False):
    t = random_exl2(K, N, parse_recipe(recipe), generator=g, bias=bias)
    return t, prepare_exl2(t, DEV)


@pytest.mark.parametrize("recipe", SINGLE + MIXES)
def test_gemm_every_recipe(recipe):
    g = _gen()
    t, p = make(1024, 512, recipe, g, bias=True)
    for m in (1, 3, 8, 17):
        check(torch.randn(m, 1024, generator=g).half().to(DEV), p, t)


@pytest.mark.parametrize("m", TOKENS)
def test_gemm_token_counts(m):
    g = _gen()
    for recipe in ("4b_128g", "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g"):
        t, p = make(2048, 768, recipe, g)
        check(torch.randn(m, 2048, generator=g).half().to(DEV), p, t)


@pytest.mark.parametrize(
    "K,N",
    [(32, 32), (64, 96), (96, 4128), (4096, 1024)]
    + [pytest.param(*kn, marks=full_size) for kn in ((4096, 14336), (14336, 4096))],
)
def test_gemm_shapes(K, N):
    g = _gen()
    recipe = "0.05:8b_32g/0.1:5b_128g/0.85:4b_128g" if K >= 4096 else "0.25:6b_32g/0.75:3b_32g"
    t, p = make(K, N, recipe, g)
    for m in (1, 2, 5, 8, 32):
        check(torch.randn(m, K, generator=g).half().to(DEV), p, t)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 1000])
def test_gemm_forced_splits(splits):
    g = _gen()
    t, p = make(1024, 256, "0.1:8b_32g/0.2:6b_64g/0.3:5b_32g/0.4:4b_32g", g, bias=True)
    for m in (1, 4, 9):
        check(torch.randn(m, 1024, generator=g).half().to(DEV), p, t, splits=splits)


def test_gemm_folded_perm_and_batch_dims():
    g = _gen()
    t = random_exl2(512, 256, parse_recipe("0.1:8b_32g/0.9:4b_64g"), generator=g)
    p = prepare_exl2(t, DEV, fold_perm=True)
    x = torch.randn(2, 3, 512, generator=g).half().to(DEV)
    check(x, p, t, x_kernel=x[..., p.input_perm.long()])


@pytest.mark.parametrize("m", [1, 8, 32, 33, 1000])
def test_matmul_switches_paths(m):
    g = _gen()
    t, p = make(1024, 512, "0.1:5b_32g/0.9:4b_32g", g, bias=True)
    x = torch.randn(m, 1024, generator=g).half().to(DEV)
    ref = reference(x, t)
    for threshold in (0, 32, 10**9):
        poison_allocator()
        y = ops.exl2_matmul(x, p, dense_threshold=threshold)
        assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL


@pytest.mark.parametrize("recipe", SINGLE + MIXES[:6])
def test_dequant_bit_exact(recipe):
    g = _gen()
    t, p = make(512, 160, recipe, g)
    poison_allocator()
    w = ops.exl2_dequant(p)
    assert torch.equal(w.view(torch.int16), dequantize(t.to(DEV)).view(torch.int16))
    pf = prepare_exl2(t, DEV, fold_perm=True)
    assert torch.equal(ops.exl2_dequant(pf).view(torch.int16), ops.exl2_dequant_ref(pf).view(torch.int16))


def test_dequant_large():
    g = _gen()
    t, p = make(14336, 4096, "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", g)
    poison_allocator(1 << 29)
    assert torch.equal(ops.exl2_dequant(p).view(torch.int16), dequantize(t.to(DEV)).view(torch.int16))


@pytest.mark.cuda
def test_graph_capture():
    """No host synchronisation inside: the ops capture into a CUDA graph and replay correctly."""
    g = _gen()
    t, p = make(1024, 512, "0.05:8b_32g/0.95:4b_128g", g)
    x = torch.randn(4, 1024, generator=g).half().to(DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.exl2_gemm(x, p)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.exl2_gemm(x, p)
    x.copy_(torch.randn(4, 1024, generator=g).half())
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, reference(x, t)) <= TOL


def test_opcheck():
    g = _gen()
    t, p = make(256, 128, "0.1:6b_32g/0.9:3b_32g", g, bias=True)
    x = torch.randn(3, 256, generator=g).half().to(DEV)
    args = (p.qweight, p.qscale, p.scale_max, p.tile_group, p.perm)
    torch.library.opcheck(torch.ops.mixq.exl2_gemm.default, (x, *args, p.bias, list(p.seg_bits), list(p.seg_rows), 0))
    torch.library.opcheck(torch.ops.mixq.exl2_dequant.default, (*args, list(p.seg_bits), list(p.seg_rows)))


@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("splits", [0, 1, 5])
def test_gemm_group(m, splits):
    """q/k/v in one launch (`exl2_gemm_group`): each output equals its own reference, with its own widths, act-order
    permutation and bias; the matrices' column blocks and splits share one grid and one counter buffer."""
    g = _gen()
    recipes = ("0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", "4b_128g", "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g")
    made = [make(1024, n, r, g, bias=j == 2) for j, (n, r) in enumerate(zip((1024, 256, 512), recipes))]
    x = torch.randn(m, 1024, generator=g).half().to(DEV)
    poison_allocator()
    ys = ops.exl2_gemm_group(x, [p for _, p in made], splits=splits)
    sync()
    for (t, p), y in zip(made, ys):
        assert y.shape == (m, p.out_features) and torch.isfinite(y).all(), "unwritten (NaN) outputs"
        err = rel_err(y, reference(x, t))
        assert err <= TOL, f"{p.out_features} wide: rel err {err:.2e}"
    # The fix-ups sum in split order whichever CTA arrives last (the emulation shuffles the block order per launch).
    again = ops.exl2_gemm_group(x, [p for _, p in made], splits=splits)
    assert all(torch.equal(a, b) for a, b in zip(ys, again)), "split-K result depends on the CTA arrival order"


def test_gemm_group_bad_input():
    g = _gen()
    (_, p1), (_, p2) = make(1024, 256, "4b_128g", g), make(512, 256, "4b_128g", g)
    x = torch.randn(2, 1024, generator=g).half().to(DEV)
    with pytest.raises(RuntimeError, match="one K"):
        ops.exl2_gemm_group(x, [p1, p2])
    with pytest.raises(RuntimeError, match="1..4 matrices"):
        ops.exl2_gemm_group(x, [p1] * 5)


@pytest.mark.parametrize("m", [1, 5, 8, 20])
@pytest.mark.parametrize("splits", [0, 1])
def test_gemm_bf16_in_and_out(m, splits):
    """bf16 x goes into the kernel as it is (staged as fp16, saturating like ops.to_half) and y comes out in bf16,
    fp32 accumulation: values beyond fp16's 65504 survive, which an fp16 output saturates."""
    g = _gen()
    t, p = make(4096, 256, "4b_128g", g)
    w = dequantize(t.to(DEV)).double()
    x = torch.randn(m, 4096, generator=g).to(DEV)
    x[0] = 4000 * torch.sign(w[:, 0]).float()  # column 0 of row 0 sums to ~1e5
    xb = x.bfloat16()
    poison_allocator()
    y = ops.exl2_gemm(xb, p, splits=splits)
    sync()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    ref = xb.double() @ w  # bf16 values are exact in fp16 at these magnitudes
    assert ref[0, 0].abs() > 65504 and (y[0, 0].double() - ref[0, 0]).abs() <= 2**-8 * ref[0, 0].abs()  # bf16 ulp
    err = rel_err(y, ref)
    assert err <= 5e-3, f"rel err {err:.2e}"  # + bf16 output rounding (2^-9 relative)
    y16 = ops.exl2_gemm(xb.half(), p, splits=splits)
    assert y16[0, 0].abs() == 65504, "fp16 output should saturate"
    ys = ops.exl2_gemm_group(xb, [p, p], splits=splits)
    assert all(torch.equal(a, y) for a in ys) if splits == 1 else all(rel_err(a, ref) <= 5e-3 for a in ys)
