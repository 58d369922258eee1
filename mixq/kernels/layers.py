"""The small ops of a decoder layer: RMSNorm with the residual add fused into it, and RoPE on q and k in one launch
(csrc/layers/). Each replaces a handful of elementwise torch kernels per layer (8 per norm, 10 for RoPE, 1 per
residual add) with one launch.

The wrappers use the kernels on a kernel device (`ops.use_kernel`) for fp16/bf16 activations and fall back to the
pure-torch references otherwise (CPU, fp32, no extension, unsupported shapes). The references are the model's own
expressions, so results off the kernel path are bit-identical to what mixq/model/mixtral.py computed before the
kernels. On the kernel path RoPE is bit-identical too; RMSNorm sums its squares in another order, which can move
a value by an ulp of the dtype (csrc/layers/rmsnorm.cu).
"""

from __future__ import annotations

import functools

import torch

from mixq.kernels import ops

_OPS = ("rms_norm", "add_rms_norm", "rope_qk")
_DTYPES = (torch.float16, torch.bfloat16)
RMS_NORM_MAX_HIDDEN = 16 * 1024  # kRmsNormMaxHidden of csrc/layers/layer_kernels.h
Rope = tuple[torch.Tensor, torch.Tensor]  # RoPE's (cos, sin) tables [N, head_dim]


@functools.cache
def available() -> bool:
    """The layer ops are registered (mixq._C built with csrc/layers, or the CPU emulation)."""
    return ops.extension_loaded() and all(hasattr(torch.ops.mixq, name) for name in _OPS)


# ---------------------------------------------------------------- references


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h): h = x + residual (x itself without a residual), out = weight * RMSNorm(h)."""
    h = x if residual is None else x + residual
    # fp32 statistics, as in transformers, so fp16 activations do not overflow.
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype), h


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim]; cos/sin: [N, head_dim] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---------------------------------------------------------------- wrappers


def _kernel_tensors(ts: list[torch.Tensor]) -> bool:
    """All on one kernel device, one fp16/bf16 dtype, no autograd (the ops have no backward)."""
    a = ts[0]
    return (
        a.dtype in _DTYPES
        and ops.use_kernel(a)
        and available()
        and all(t.dtype == a.dtype and t.device == a.device and not t.requires_grad for t in ts)
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h) as `rms_norm_ref`, over the last dimension of x `[..., H]`; with a residual, one launch for the add
    and the norm (h is a new tensor; without a residual h is x itself)."""
    H = x.shape[-1]
    fused = (
        _kernel_tensors([x, weight] + ([] if residual is None else [residual]))
        and 1 <= H <= RMS_NORM_MAX_HIDDEN
        and weight.shape == (H,)
        and (residual is None or residual.shape == x.shape)
    )
    if not fused:
        return rms_norm_ref(x, weight, eps, residual)
    x2 = x.reshape(-1, H).contiguous()
    if residual is None:
        return torch.ops.mixq.rms_norm(x2, weight.contiguous(), eps).view(x.shape), x
    out, h = torch.ops.mixq.add_rms_norm(x2, residual.reshape(-1, H).contiguous(), weight.contiguous(), eps)
    return out.view(x.shape), h.view(x.shape)


def apply_rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q `[N, heads, D]` and k `[N, kv_heads, D]` with cos/sin `[N, D]`, as `apply_rope_ref` on each.

    The kernel rotates q and k in place (views with any row and head strides, e.g. of a projection's output, a
    head's D values contiguous; q and k must not overlap) and returns them; the reference returns new tensors.
    Use the returned pair either way."""
    fused = (
        _kernel_tensors([q, k, cos, sin])
        and q.dim() == k.dim() == 3
        and q.shape[-1] % 2 == 0
        and k.shape[0] == q.shape[0]
        and k.shape[-1] == q.shape[-1]
        and cos.shape == sin.shape == (q.shape[0], q.shape[-1])
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )
    if not fused:
        return apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
    torch.ops.mixq.rope_qk(q, k, cos.contiguous(), sin.contiguous())
    return q, k


def rope_qk(q: torch.Tensor, k: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope_qk` with the tables `rope` = (cos, sin); (q, k) unchanged when rope is None (already applied)."""
    return (q, k) if rope is None else apply_rope_qk(q, k, *rope)


# ---------------------------------------------------------------- fake impls (shapes only; for opcheck/compile)

if available():

    @torch.library.register_fake("mixq::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("mixq::add_rms_norm")
    def _add_rms_norm_fake(x, residual, weight, eps):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake("mixq::rope_qk")
    def _rope_qk_fake(q, k, cos, sin):
        return None
