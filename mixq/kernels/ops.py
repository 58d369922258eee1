"""Typed wrappers over `torch.ops.mixq.*` (the CUDA extension `mixq._C`), their fake (meta) impls, and the
pure-torch references the kernels must match (also the CPU fallbacks).

No op reads a device value on the host, so every wrapper is safe inside a CUDA graph; the only host-side
decision (`exl2_matmul`'s kernel vs dequantize+matmul switch) uses the token count, a shape.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from mixq.exl2.layout import PreparedExl2, unpack_prepared
from mixq.exl2.pack import unpack_scales

# MIXQ_CUDA_EMU=<library>: the kernels built for the CPU emulation (tools/cuda_emu/build.py) instead of mixq._C;
# they take CPU tensors, so the GPU tests' kernel checks run without a GPU.
_EMU_LIB = os.environ.get("MIXQ_CUDA_EMU", "")
if _EMU_LIB:
    torch.ops.load_library(_EMU_LIB)
    _EXT = True
else:
    try:  # importing registers the ops; it needs torch's libraries loaded first (done above)
        import mixq._C  # noqa: F401

        _EXT = True
    except ImportError:
        _EXT = False

# Tokens at or below which exl2_matmul uses the fused kernel; above, dequantize + torch.matmul.
# A first guess (exllamav2 uses 32 rows); to be measured with bench/bench_kernels.py.
DEFAULT_DENSE_THRESHOLD = 32


def extension_loaded() -> bool:
    return _EXT


def emulated() -> bool:
    """The ops are the CPU emulation's (MIXQ_CUDA_EMU): kernels run on CPU tensors."""
    return bool(_EMU_LIB)


def kernel_device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU under the emulation."""
    return torch.device("cpu" if _EMU_LIB else "cuda")


def cuda_ops_available() -> bool:
    """The compiled extension imports AND a device that runs it is usable (a GPU, or the CPU emulation)."""
    return _EXT and (bool(_EMU_LIB) or torch.cuda.is_available())


def use_kernel(where: torch.Tensor | torch.device) -> bool:
    """Whether ops on a tensor (or device) go to the kernels: CUDA with mixq._C, the CPU under the emulation."""
    dev = where if isinstance(where, torch.device) else where.device
    return _EXT and dev.type == kernel_device().type


# ---------------------------------------------------------------- EXL2


# The EXL2 and MoE kernels take fp16 or bf16 activations (in and out; they multiply in fp16, so a bf16 x is
# saturated to fp16's range as they stage it); fp32 ones go through to_half first.
ACT_DTYPES = (torch.float16, torch.bfloat16)
FP16_MAX = torch.finfo(torch.float16).max


@functools.cache
def _fp16_limit(dtype: torch.dtype) -> float:
    """The largest value of `dtype` that fp16 holds: 65504, or 65280 in bf16 (where 65504 rounds up to 65536)."""
    lim = torch.tensor(FP16_MAX, dtype=dtype)
    return float(torch.nextafter(lim, lim.new_zeros(())) if lim.item() > FP16_MAX else lim)


def to_half(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp16 for the kernels, saturating: |x| beyond fp16's range (bf16/fp32 models) becomes its largest value
    instead of inf, which would turn into NaN (inf - inf) downstream; NaN stays NaN (an inf input saturates too).
    For fp32 inputs and the fp16-only paths; the GEMM kernels saturate bf16 themselves as they stage x."""
    if x.dtype == torch.float16:
        return x
    lim = _fp16_limit(x.dtype)
    return x.clamp(-lim, lim).to(torch.float16)


def _act(x: torch.Tensor) -> torch.Tensor:
    """x in an activation type the kernels take (fp16 or bf16 as they are; fp32 through to_half)."""
    return x if x.dtype in ACT_DTYPES else to_half(x)


def _exl2_args(p: PreparedExl2) -> tuple:
    return p.qweight, p.qscale, p.scale_max, p.tile_group, p.perm


def exl2_gemm(x: torch.Tensor, p: PreparedExl2, splits: int = 0, max_partial_bytes: int = 0) -> torch.Tensor:
    """`x[..., K] @ W (+ bias)` with the fused kernel for any token count (fp16 or bf16 in and out, fp32 accumulate;
    fp32 x is rounded to fp16 first).

    `splits` forces the split-K count (0: automatic). `max_partial_bytes` caps the fp32 split-K scratch; more
    tokens run in passes (0: the kernel's 64 MB default). Inputs must already be in stored order when the
    permutation was folded (`p.perm is None`).
    """
    if not use_kernel(x):
        return exl2_matmul_ref(to_half(x), p)
    lead = x.shape[:-1]
    x2 = _act(x.reshape(-1, x.shape[-1])).contiguous()
    args = (*_exl2_args(p), p.bias, list(p.seg_bits), list(p.seg_rows), splits, max_partial_bytes)
    y = torch.ops.mixq.exl2_gemm(x2, *args)
    return y.view(*lead, p.out_features)


def exl2_gemm_group(x: torch.Tensor, ps: list[PreparedExl2], splits: int = 0) -> list[torch.Tensor]:
    """`[x @ W_j (+ bias_j) for each p_j]` in ONE launch (the fused kernel, any token count; q/k/v of a layer).
    Every matrix reads the same x, so none may have its permutation folded (`p.perm is None`) unless all are.
    Off the kernel device: the reference, matrix by matrix."""
    if not use_kernel(x):
        return [exl2_matmul_ref(to_half(x), p) for p in ps]
    lead = x.shape[:-1]
    x2 = _act(x.reshape(-1, x.shape[-1])).contiguous()
    bits = [b for p in ps for b in p.seg_bits]
    rows = [r for p in ps for r in p.seg_rows]
    ys = torch.ops.mixq.exl2_gemm_group(
        x2, *([getattr(p, a) for p in ps] for a in ("qweight", "qscale", "scale_max", "tile_group", "perm", "bias")),
        bits, rows, [len(p.seg_bits) for p in ps], splits,
    )  # fmt: skip
    return [y.view(*lead, p.out_features) for y, p in zip(ys, ps)]


def exl2_gemm_pass_rows(p: PreparedExl2, num_tokens: int, splits: int = 0, max_partial_bytes: int = 0) -> int:
    """Rows per pass `exl2_gemm` runs `num_tokens` tokens in (its own planning arithmetic, on the host)."""
    return torch.ops.mixq.exl2_gemm_pass_rows(
        p.out_features, list(p.seg_bits), list(p.seg_rows), num_tokens, splits, max_partial_bytes
    )


def exl2_dequant(p: PreparedExl2) -> torch.Tensor:
    """fp16 `W[K, N]`: original feature order when `p.perm` is set, stored order when it was folded."""
    if not use_kernel(p.qweight):
        return exl2_dequant_ref(p)
    return torch.ops.mixq.exl2_dequant(*_exl2_args(p), list(p.seg_bits), list(p.seg_rows))


def exl2_matmul(
    x: torch.Tensor, p: PreparedExl2, *, dense_threshold: int = DEFAULT_DENSE_THRESHOLD, splits: int = 0
) -> torch.Tensor:
    """`y = x @ W (+ bias)` in x's dtype. Up to `dense_threshold` tokens: the fused kernel; more: dequantize to
    fp16 and use torch.matmul (long prompts, where the GEMM is compute-bound and cuBLAS wins)."""
    tokens = x.numel() // x.shape[-1]
    if not use_kernel(x):
        return exl2_matmul_ref(x, p)
    if tokens <= dense_threshold:
        return exl2_gemm(x, p, splits).to(x.dtype)
    w = exl2_dequant(p)
    y = to_half(x) @ w
    if p.bias is not None:
        y = y + p.bias
    return y.to(x.dtype)


def exl2_dequant_ref(p: PreparedExl2) -> torch.Tensor:
    """Pure-torch twin of the dequant kernel, bit-exact: fp16((q - z) * fp16 scale)."""
    q = unpack_prepared(p.qweight, p.seg_bits, p.seg_rows).float()
    codes = unpack_scales(p.qscale, p.out_features)
    scale = ((codes + 1).square().half().float() * p.scale_max.float().unsqueeze(1)).half().float()
    row_scale = scale[p.tile_group.long().repeat_interleave(32)]
    zero = torch.cat([torch.full((r,), float(1 << (b - 1))) for b, r in zip(p.seg_bits, p.seg_rows)])
    w = ((q - zero.to(q.device).unsqueeze(1)) * row_scale).half()
    if p.perm is None:
        return w
    out = torch.empty_like(w)
    out[p.perm.long()] = w
    return out


def exl2_matmul_ref(x: torch.Tensor, p: PreparedExl2) -> torch.Tensor:
    """fp32-accumulated reference in x's dtype (x in original order, or stored order if the perm was folded)."""
    y = x.float() @ exl2_dequant_ref(p).float()
    if p.bias is not None:
        y = y + p.bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------- routing


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits `[T, E]` -> (weights fp32 `[T, k]`, expert ids int32 `[T, k]`), ties to the lower index."""
    if not use_kernel(logits):
        return topk_softmax_ref(logits, top_k, renormalize)
    return torch.ops.mixq.topk_softmax(logits.float().contiguous(), top_k, renormalize)


def moe_router(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused router: `x[T, H] @ weight[E, H].T` in fp32, then `topk_softmax`. Returns (logits, weights, ids)."""
    if not use_kernel(x) or x.dtype not in (torch.float16, torch.bfloat16):
        logits = x.float() @ weight.float().t()
        return (logits, *topk_softmax_ref(logits, top_k, renormalize))
    return torch.ops.mixq.moe_router(x.contiguous(), weight.to(x.dtype).contiguous(), top_k, renormalize)


def topk_softmax_ref(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference semantics: softmax in fp32 over all experts, the k largest logits (a stable descending sort, so
    equal logits go to the lower expert index), their probabilities divided by their sum when `renormalize`."""
    lf = logits.float()
    ids = torch.sort(lf, dim=-1, descending=True, stable=True).indices[..., :top_k]
    w = torch.softmax(lf, dim=-1).gather(-1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids.to(torch.int32)


@dataclass
class MoeAlignment:
    """Assignments (flat index `t * k + j`) grouped by expert, each expert's run padded to `block_m` rows."""

    counts: torch.Tensor  # int32 [E]
    offsets: torch.Tensor  # int32 [E + 1], padded exclusive prefix sum
    sorted_ids: torch.Tensor  # int32 [capacity]: flat index per row, `T * k` in padding rows
    block_expert: torch.Tensor  # int32 [capacity / block_m]: expert of each block, -1 past the end
    positions: torch.Tensor  # int32 [T, k]: row of each assignment in sorted_ids, -1 for ids outside [0, E)


def align_capacity(n: int, num_experts: int, block_m: int) -> int:
    """Static size of `sorted_ids`: the largest padded total, so no host sync is needed to allocate it."""
    return -(-(n + num_experts * (block_m - 1)) // block_m) * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    if not use_kernel(topk_ids):
        return moe_align_ref(topk_ids, num_experts, block_m)
    return MoeAlignment(*torch.ops.mixq.moe_align(topk_ids.to(torch.int32).contiguous(), num_experts, block_m))


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """Reference grouping: stable (ascending flat index within an expert), host loops (tests / CPU only)."""
    flat = topk_ids.reshape(-1).long().cpu()
    n, E = flat.numel(), num_experts
    cap = align_capacity(n, E, block_m)
    counts = torch.zeros(E, dtype=torch.int64)
    valid = (flat >= 0) & (flat < E)
    counts += torch.bincount(flat[valid], minlength=E)[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(padded, 0)
    sorted_ids = torch.full((cap,), n, dtype=torch.int64)
    positions = torch.full((n,), -1, dtype=torch.int64)
    block_expert = torch.full((cap // block_m,), -1, dtype=torch.int64)
    for e in range(E):
        idx = torch.nonzero(flat == e).flatten()  # ascending
        rows = offsets[e] + torch.arange(idx.numel())
        sorted_ids[rows] = idx
        positions[idx] = rows
        block_expert[int(offsets[e]) // block_m : int(offsets[e + 1]) // block_m] = e
    dev = topk_ids.device
    return MoeAlignment(
        *(t.to(dev, torch.int32) for t in (counts, offsets, sorted_ids, block_expert)),
        positions.view(topk_ids.shape).to(dev, torch.int32),
    )


# ---------------------------------------------------------------- fake impls (shapes only; for opcheck/compile)

if _EXT:

    @torch.library.register_fake("mixq::exl2_gemm")
    def _exl2_gemm_fake(
        x, qweight, qscale, scale_max, tile_group, perm, bias, seg_bits, seg_rows, splits=0, max_partial_bytes=0
    ):
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("mixq::exl2_gemm_group")
    def _exl2_gemm_group_fake(
        x, qweight, qscale, scale_max, tile_group, perm, bias, seg_bits, seg_rows, num_segments, splits=0,
        max_partial_bytes=0,
    ):  # fmt: skip
        return [x.new_empty((x.shape[0], q.shape[1])) for q in qweight]

    @torch.library.register_fake("mixq::exl2_dequant")
    def _exl2_dequant_fake(qweight, qscale, scale_max, tile_group, perm, seg_bits, seg_rows):
        return qweight.new_empty((sum(seg_rows), qweight.shape[1]), dtype=torch.float16)

    @torch.library.register_fake("mixq::topk_softmax")
    def _topk_softmax_fake(logits, top_k, renormalize=True):
        T = logits.shape[0]
        return logits.new_empty((T, top_k)), logits.new_empty((T, top_k), dtype=torch.int32)

    @torch.library.register_fake("mixq::moe_router")
    def _moe_router_fake(x, weight, top_k, renormalize=True):
        T, E = x.shape[0], weight.shape[0]
        f32 = torch.float32
        return (
            x.new_empty((T, E), dtype=f32),
            x.new_empty((T, top_k), dtype=f32),
            x.new_empty((T, top_k), dtype=torch.int32),
        )

    @torch.library.register_fake("mixq::moe_align")
    def _moe_align_fake(topk_ids, num_experts, block_m):
        cap = align_capacity(topk_ids.numel(), num_experts, block_m)
        i32 = torch.int32
        return (
            topk_ids.new_empty((num_experts,), dtype=i32),
            topk_ids.new_empty((num_experts + 1,), dtype=i32),
            topk_ids.new_empty((cap,), dtype=i32),
            topk_ids.new_empty((cap // block_m,), dtype=i32),
            topk_ids.new_empty(topk_ids.shape, dtype=i32),
        )
