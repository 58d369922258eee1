"""Per-layer kernels (mixq.kernels.layers, csrc/layers/): fused RMSNorm (+ residual add) and RoPE on q and k.

CPU part (always runs): `RMSNorm.forward_add` and the decoder layer's wiring (fused add, one RoPE call, residual
into the MoE) equal the formulas they replaced, bit for bit, on the reference path.

Kernel part (a GPU with mixq._C, or the CPU kernel emulation; skipped otherwise), outputs poisoned first:
- rms_norm / add_rms_norm vs `rms_norm_ref`: h bit-exact (one fp32 add, one rounding in both); out within 2 ulps
  of the dtype, and at most 1% (or 2) of the values not bit-exact. Kernel and reference compute the same fp32
  expression except for the order of the sum of squares (and torch's GPU rsqrt): ~1e-7 relative in 1/rms. So the
  normalised value, rounded to the dtype (ulp 2^-10 or 2^-7 relative), is at most one ulp off, and only when it lies
  that close to a rounding boundary (measured under the emulation: 3e-5 of the fp16 values, 1e-5 of bf16). The
  weight product of two values one ulp apart differs by < 2 ulps exactly, so by <= 2 once each is rounded. A missing
  rounding (25-30% of the values off by one ulp), fp16/bf16 statistics or a wrong row exceed one of the bounds.
- rope_qk vs `apply_rope_ref`: bit-exact (the kernel rounds each product and the sum as torch does), on q/k views
  of one fused-qkv-like buffer with v's columns checked untouched.
"""

import pytest
import torch
from conftest import TINY_MIXTRAL
from kernel_env import DEV, poison_allocator, sync
from torch._subclasses.fake_tensor import FakeTensorMode

from mixq.kernels import layers, ops
from mixq.model.config import MixtralConfig
from mixq.model.mixtral import (
    Attention,
    DecoderLayer,
    DenseCausalContext,
    DenseLinear,
    Expert,
    RMSNorm,
    SparseMoE,
    rope_cos_sin,
)


def _gen() -> tuple[torch.Generator, int]:
    seed = torch.seed()
    return torch.Generator().manual_seed(seed), seed


def _kernels_on_cpu() -> bool:
    return ops.use_kernel(torch.device("cpu"))


# ---------------------------------------------------------------- CPU: wiring (reference path)


def _old_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward before the kernels (mixq/model/mixtral.py)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(x.dtype)


def _old_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _old_layer(layer: DecoderLayer, h, cos, sin, ctx):
    """DecoderLayer.forward before the kernels: separate adds, RoPE per tensor, MoE without the residual."""
    at = layer.self_attn
    x = _old_norm(layer.input_layernorm, h)
    n = x.shape[0]
    q = _old_rope(at.q_proj(x).view(n, at.n_heads, at.head_dim), cos, sin)
    k = _old_rope(at.k_proj(x).view(n, at.n_kv, at.head_dim), cos, sin)
    v = at.v_proj(x).view(n, at.n_kv, at.head_dim)
    h = h + at.o_proj(ctx.attend(at.layer, q, k, v, at.scale).reshape(n, at.n_heads * at.head_dim))
    return h + layer.block_sparse_moe(_old_norm(layer.post_attention_layernorm, h))


REF_DTYPES = [
    torch.float32,
    *(
        pytest.param(dt, marks=pytest.mark.skipif(_kernels_on_cpu(), reason="CPU fp16/bf16 run the kernels here"))
        for dt in (torch.float16, torch.bfloat16)
    ),
]


@pytest.mark.parametrize("dtype", REF_DTYPES)
def test_forward_add_is_norm_of_the_sum(dtype):
    g, seed = _gen()
    x, r = (torch.randn(5, 48, generator=g).to(dtype) for _ in range(2))
    norm = RMSNorm((1 + 0.1 * torch.randn(48, generator=g)).to(dtype), 1e-5)
    out, h = norm.forward_add(x, r)
    assert torch.equal(h, x + r), seed
    assert torch.equal(out, _old_norm(norm, x + r)), seed
    assert torch.equal(norm(x), _old_norm(norm, x)), seed


@pytest.mark.parametrize("dtype", REF_DTYPES)
def test_layer_wiring_matches_the_old_formula(dtype):
    g, seed = _gen()
    cfg = MixtralConfig(**TINY_MIXTRAL)
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def lin(o, i):
        return DenseLinear((0.1 * torch.randn(o, i, generator=g)).to(dtype))

    def norm():
        return RMSNorm((1 + 0.1 * torch.randn(H, generator=g)).to(dtype), cfg.rms_norm_eps)

    attn = Attention(cfg, 0, lin(cfg.q_size, H), lin(cfg.kv_size, H), lin(cfg.kv_size, H), lin(H, cfg.q_size))
    experts = [Expert(lin(I, H), lin(H, I), lin(I, H)) for _ in range(cfg.num_local_experts)]
    layer = DecoderLayer(norm(), attn, norm(), SparseMoE(cfg, lin(cfg.num_local_experts, H), experts)).eval()
    B, T = 2, 7
    ctx = DenseCausalContext(B, T, torch.device("cpu"), None)
    cos, sin = rope_cos_sin(ctx.positions, D, cfg.rope_theta, dtype)
    h = torch.randn(B * T, H, generator=g).to(dtype)
    with torch.inference_mode():
        assert torch.equal(layer(h, cos, sin, ctx), _old_layer(layer, h, cos, sin, ctx)), seed


# ---------------------------------------------------------------- kernels

HIDDEN = [256, 4096 if DEV.type == "cuda" else 1024, 264, 100]
ROWS = (1, 3, 8, 33)
ULP_BITS = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}  # mantissa bits, smallest normal exponent


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at |v| (fp32 values of that dtype)."""
    bits, emin = ULP_BITS[dtype]
    _, e = torch.frexp(v.float())
    e = torch.where(v == 0, torch.full_like(e, emin), (e - 1).clamp(min=emin))
    return torch.pow(2.0, (e - bits).float())


def _norm_inputs(N, H, dtype, g):
    """Rows of random scale, a quarter of them large (|x| ~ 1e4 in bf16, ~4e3 in fp16: squares overflow fp16)."""
    big = 1e4 if dtype == torch.bfloat16 else 4e3
    scale = torch.where(torch.rand(N, 1, generator=g) < 0.25, big, torch.rand(N, 1, generator=g) * 4 + 0.01)
    if N > 1:
        scale[0] = big
    x = (torch.randn(N, H, generator=g) * scale).to(dtype)
    res = (torch.randn(N, H, generator=g) * scale).to(dtype)
    w = (1 + 0.2 * torch.randn(H, generator=g)).to(dtype)
    return x.to(DEV), res.to(DEV), w.to(DEV)


def _check_norm(out, ref, dtype, what):
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an unwritten, poisoned element?)"
    o, r = out.float().cpu(), ref.float().cpu()
    err = (o - r).abs()
    tol = 2 * torch.maximum(_ulp(r, dtype), _ulp(o, dtype))
    assert (err <= tol).all(), f"{what}: {(err / tol).max().item():.2f} x the 2-ulp bound"
    inexact = (o != r).sum().item()
    assert inexact <= max(2, o.numel() // 100), f"{what}: {inexact} of {o.numel()} values not bit-exact"


@pytest.mark.kernels
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rms_norm_matches_reference(dtype, H, residual):
    g, seed = _gen()
    eps = 1e-5
    for N in ROWS:
        x, res, w = _norm_inputs(N, H, dtype, g)
        poison_allocator()
        if residual:
            out, h = torch.ops.mixq.add_rms_norm(x, res, w, eps)
        else:
            out, h = torch.ops.mixq.rms_norm(x, w, eps), x
        sync()
        ref_out, ref_h = layers.rms_norm_ref(x, w, eps, res if residual else None)
        what = f"N={N} H={H} {dtype} seed={seed}"
        assert torch.equal(h, ref_h), f"{what}: h != x + residual"
        _check_norm(out, ref_out, dtype, what)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rms_norm_unaligned_rows_and_wrapper(dtype, monkeypatch):
    """Rows not on a 16-byte boundary take the one-value-per-load path; the wrapper calls the kernel (no
    reference) for [..., H] inputs and keeps x itself as h without a residual."""
    g, seed = _gen()
    N, H, eps = 5, 256, 1e-6
    x, res, w = _norm_inputs(N, H, dtype, g)
    buf = torch.empty(N * H + 1, dtype=dtype, device=DEV)
    xu = buf[1:].view(N, H)
    xu.copy_(x)
    ref_out, ref_h = layers.rms_norm_ref(x, w, eps, res)
    ref_plain = layers.rms_norm_ref(x, w, eps)[0]
    out, h = torch.ops.mixq.add_rms_norm(xu, res, w, eps)
    assert torch.equal(h, ref_h), seed
    _check_norm(out, ref_out, dtype, f"unaligned seed={seed}")

    def no_ref(*a, **k):
        raise AssertionError("the reference ran on the kernel path")

    monkeypatch.setattr(layers, "rms_norm_ref", no_ref)
    out3, h3 = layers.rms_norm(x.view(1, N, H), w, eps, res.view(1, N, H))
    assert out3.shape == (1, N, H) and torch.equal(h3.view(N, H), ref_h), seed
    _check_norm(out3.view(N, H), ref_out, dtype, f"wrapper seed={seed}")
    out4, h4 = layers.rms_norm(x, w, eps)
    assert h4 is x
    _check_norm(out4, ref_plain, dtype, f"wrapper plain seed={seed}")
    empty = torch.empty(0, H, dtype=dtype, device=DEV)
    assert layers.rms_norm(empty, w, eps, empty)[0].shape == (0, H)


@pytest.mark.kernels
def test_rms_norm_fallbacks_and_errors():
    g, _ = _gen()
    x, res, w = _norm_inputs(3, 64, torch.float16, g)
    xf, wf = x.float(), w.float()
    out, h = layers.rms_norm(xf, wf, 1e-5, res.float())  # fp32: the reference
    assert torch.equal(out, layers.rms_norm_ref(xf, wf, 1e-5, res.float())[0]) and out.dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"mixq: x must be float16 or bfloat16"):
        torch.ops.mixq.rms_norm(xf, wf, 1e-5)
    with pytest.raises(RuntimeError, match=r"mixq: weight must be"):
        torch.ops.mixq.rms_norm(x, w[:32], 1e-5)
    with pytest.raises(RuntimeError, match=r"mixq: weight must be BFloat16 like x, got Half"):
        torch.ops.mixq.rms_norm(x.bfloat16(), w, 1e-5)
    with pytest.raises(RuntimeError, match=r"mixq: residual must be"):
        torch.ops.mixq.add_rms_norm(x, res[:2], w, 1e-5)
    with pytest.raises(RuntimeError, match=r"mixq: x must be \[N, H\]"):
        torch.ops.mixq.rms_norm(x.view(3, 8, 8), w, 1e-5)
    with pytest.raises(RuntimeError, match=r"mixq: x must be contiguous"):
        torch.ops.mixq.rms_norm(x.t(), w[:3], 1e-5)


def _qkv(N, Hq, Hkv, D, dtype, g, pad=0):
    """q/k/v views of one [N, (Hq + 2 Hkv) D + pad] buffer, as a fused qkv projection would give them."""
    W = (Hq + 2 * Hkv) * D + pad
    buf = (torch.randn(N, W, generator=g) * 3).to(dtype).to(DEV)
    q = buf[:, : Hq * D].view(N, Hq, D)
    k = buf[:, Hq * D : (Hq + Hkv) * D].view(N, Hkv, D)
    return buf, q, k


def _rope_check(N, Hq, Hkv, D, dtype, pad=0):
    g, seed = _gen()
    buf, q, k = _qkv(N, Hq, Hkv, D, dtype, g, pad)
    positions = torch.randint(0, 32768, (N,), generator=g)
    positions[0] = 32767
    cos, sin = (t.to(DEV) for t in rope_cos_sin(positions, D, 1e6, dtype))
    before = buf.clone()
    want_q, want_k = layers.apply_rope_ref(q, cos, sin), layers.apply_rope_ref(k, cos, sin)
    torch.ops.mixq.rope_qk(q, k, cos, sin)
    sync()
    what = f"N={N} Hq={Hq} Hkv={Hkv} D={D} {dtype} seed={seed}"
    assert torch.equal(q, want_q), f"{what}: q differs"
    assert torch.equal(k, want_k), f"{what}: k differs"
    assert torch.equal(buf[:, (Hq + Hkv) * D :], before[:, (Hq + Hkv) * D :]), f"{what}: v (or padding) written"


@pytest.mark.kernels
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", [(32, 8), (4, 2)], ids=["32q8kv", "4q2kv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rope_qk_matches_reference(dtype, heads, D):
    for N in (1, 7, 33):
        _rope_check(N, *heads, D, dtype)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rope_qk_unvectorised_layouts(dtype):
    _rope_check(5, 4, 2, 64, dtype, pad=1)  # row stride not a multiple of 8: one pair per thread
    _rope_check(5, 3, 1, 36, dtype)  # D/2 = 18 not a multiple of 8


@pytest.mark.kernels
def test_rope_qk_wrapper_and_errors(monkeypatch):
    g, seed = _gen()
    N, D = 4, 64
    _, q, k = _qkv(N, 4, 2, D, torch.bfloat16, g)
    cos, sin = (t.to(DEV) for t in rope_cos_sin(torch.arange(N), D, 1e6, torch.bfloat16))
    want = layers.apply_rope_ref(q, cos, sin), layers.apply_rope_ref(k, cos, sin)
    monkeypatch.setattr(layers, "apply_rope_ref", lambda *a: pytest.fail("the reference ran on the kernel path"))
    q2, k2 = layers.apply_rope_qk(q, k, cos, sin)
    assert q2 is q and k2 is k and torch.equal(q, want[0]) and torch.equal(k, want[1]), seed
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"mixq: k must be BFloat16 like q, got Half"):
        torch.ops.mixq.rope_qk(q, k.half(), cos, sin)
    with pytest.raises(RuntimeError, match=r"mixq: cos must be a contiguous"):
        torch.ops.mixq.rope_qk(q, k, cos[:, : D // 2], sin)
    with pytest.raises(RuntimeError, match=r"mixq: q must be \[N, heads, head_dim\]"):
        torch.ops.mixq.rope_qk(q.reshape(N, -1), k, cos, sin)
    with pytest.raises(RuntimeError, match=r"mixq: q must be float16 or bfloat16"):
        torch.ops.mixq.rope_qk(q.float(), k.float(), cos.float(), sin.float())
    with pytest.raises(RuntimeError, match=r"mixq: k must be \[N="):
        torch.ops.mixq.rope_qk(q, k[:2], cos, sin)


@pytest.mark.kernels
def test_fake_impls():
    with FakeTensorMode():
        x = torch.empty(3, 64, dtype=torch.float16)
        w = torch.empty(64, dtype=torch.float16)
        assert torch.ops.mixq.rms_norm(x, w, 1e-5).shape == (3, 64)
        out, h = torch.ops.mixq.add_rms_norm(x, x, w, 1e-5)
        assert out.shape == h.shape == (3, 64) and out.dtype == torch.float16
        q, k = torch.empty(3, 4, 16, dtype=torch.float16), torch.empty(3, 2, 16, dtype=torch.float16)
        assert torch.ops.mixq.rope_qk(q, k, torch.empty(3, 16, dtype=torch.float16), q[:, 0]) is None
