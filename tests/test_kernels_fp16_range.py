"""Activations beyond fp16's range through the fp16 EXL2 kernels (bf16 and fp32 models): inputs are clipped to
+-65504 and outputs saturate there instead of becoming inf (which turns into NaN downstream). Against the fp64
reference of the clipped input; on a GPU with mixq._C or under the CPU emulation (poisoned allocations)."""

import pytest
import torch
from kernel_env import DEV, poison_allocator, sync

from mixq.exl2.layout import prepare_exl2
from mixq.exl2.qparams import parse_recipe
from mixq.exl2.reference import dequantize
from mixq.kernels import ops
from mixq.synthetic.exl2_layer import random_exl2

TOL = 1e-3  # as tests/test_kernels_exl2.py
FP16_MAX = 65504.0


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


def _layer(g, K=512, N=256):
    t = random_exl2(K, N, parse_recipe("0.1:8b_32g/0.9:4b_64g"), generator=g, bias=True)
    return t, prepare_exl2(t, DEV), dequantize(t.to(DEV)).double()


def _ref(x: torch.Tensor, t, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w + t.bias.double().to(DEV)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _limit(dtype) -> float:
    """Where inputs of `dtype` saturate: fp16's largest value, or bf16's largest below it (65504 is no bf16)."""
    return {torch.float32: FP16_MAX, torch.bfloat16: 65280.0}[dtype]


def _outliers(g, m: int, K: int, dtype) -> torch.Tensor:
    """Activations with three outliers per token at 1e5..1e6 (a bf16 model's), beyond fp16's range."""
    x = torch.randn(m, K, generator=g)
    sign = torch.where(torch.rand(m, 3, generator=g) < 0.5, -1.0, 1.0)
    x.scatter_(1, torch.randint(K, (m, 3), generator=g), (1e5 + 9e5 * torch.rand(m, 3, generator=g)) * sign)
    x = x.to(dtype).to(DEV)
    assert x.float().abs().max() > FP16_MAX
    return x


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inputs_beyond_fp16_are_clipped_not_inf(dtype):
    """exl2_matmul's dequantize + matmul path (long prompts): before, x.to(fp16) made the outliers inf and the
    outputs inf/NaN; now they are clipped and the result is the reference's for the clipped input. (The fused
    kernel gets the same clipped input and sums in fp32: test_fused_kernel_sums_large_activations_in_fp32.)"""
    g = _gen()
    t, p, w = _layer(g)
    x = _outliers(g, 40, p.in_features, dtype)
    ref = _ref(x.double().clamp(-_limit(dtype), _limit(dtype)), t, w)
    assert ref.abs().max() < FP16_MAX / 2  # the outputs themselves stay in range here
    poison_allocator()
    y = ops.exl2_matmul(x, p, dense_threshold=0)
    sync()
    tol = TOL + (2**-8 if dtype == torch.bfloat16 else 0)  # the result is rounded to x's dtype (bf16: 8 bits)
    assert y.dtype == dtype and torch.isfinite(y).all() and _rel_err(y, ref) <= tol


@pytest.mark.kernels
@pytest.mark.parametrize("splits", [1, 4])
def test_outputs_beyond_fp16_saturate(splits):
    """fp16 inputs whose products pass 65504: token t's input is a * sign(W[:, n_t]), so output n_t is
    a * sum |W[:, n_t]| > 1.5 x 65504. Those outputs are stored as +-65504 (the fp32 accumulators hold the true
    value; before, the fp16 store made them inf), the others match the reference."""
    g = _gen()
    K, N, m, a = 4096, 128, 3, 2000.0
    t, p, w = _layer(g, K, N)
    big = torch.nonzero(a * w.abs().sum(0) > 1.5 * FP16_MAX).flatten()
    assert big.numel() >= m, "the random layer's columns are too small for this test"
    cols = big[torch.randperm(big.numel(), generator=g)[:m]]
    x = (a * torch.sign(w[:, cols].T)).half()
    ref = _ref(x, t, w)
    over = ref.abs() > FP16_MAX * 1.001
    assert over[torch.arange(m), cols].all(), ref[torch.arange(m), cols]  # the aligned outputs pass fp16's range
    poison_allocator()
    y = ops.exl2_gemm(x, p, splits=splits)
    sync()
    assert torch.isfinite(y).all(), "an output past fp16's range became inf"
    assert torch.equal(y[over].double(), torch.sign(ref[over]) * FP16_MAX)
    inside = ~over & (ref.abs() < FP16_MAX * 0.999)
    assert _rel_err(y[inside], ref[inside]) <= TOL


@pytest.mark.kernels
@pytest.mark.parametrize("m", [1, 5, 8])
def test_fused_kernel_sums_large_activations_in_fp32(m):
    """Activations far above 4094 in magnitude, aligned with one column's weight signs, through the fused kernel
    (exl2_gemm): the tensor-core loop sums each tile's products in fp32, so the result matches the reference; the
    CUDA-core loop before it summed 16 rows in fp16 and overflowed there (|x| had to stay below 4094)."""
    g = _gen()
    t, p, w = _layer(g, K=128, N=256)
    n = int(torch.randint(0, 256, (1,), generator=g))
    a = min(6e4, 4e4 / float(w[:, n].abs().sum()))  # column n's output stays inside fp16's range
    assert a > 8000, "the random column is too large for this test"
    x = torch.randn(m, 128, generator=g) * 100
    x[0] = a * torch.sign(w[:, n]).float().cpu()
    x = x.half().to(DEV)
    ref = _ref(x, t, w)
    poison_allocator()
    y = ops.exl2_gemm(x, p)
    sync()
    assert torch.isfinite(y).all(), "a large activation overflowed"
    assert _rel_err(y[0, n : n + 1], ref[0, n : n + 1]) <= TOL
    assert _rel_err(y, ref) <= TOL


def test_to_half_keeps_nan_and_fp16():
    """The input conversion alone (no kernel needed): saturating, NaN kept, fp16 passed through."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([1e6, -1e6, float("nan"), 3.0, -65280.0, 70000.0], dtype=dtype)
        h = ops.to_half(x)
        lim = _limit(dtype)
        assert h.dtype == torch.float16 and torch.isnan(h[2])
        assert h[[0, 1, 3, 4, 5]].tolist() == [lim, -lim, 3.0, -65280.0, lim]
    f = torch.randn(7, dtype=torch.float16)
    assert ops.to_half(f) is f  # fp16 inputs: no copy, no extra kernel
