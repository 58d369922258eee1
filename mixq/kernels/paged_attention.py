"""Paged decode attention and KV cache writes: the CUDA ops of csrc/attention and their PyTorch references.

Cache layout per layer (mixq/engine/kv_cache.py): `[slots, kv_heads, row]`, slot = page * page_size + offset. The
storage mode follows from the cache dtype; the formats are those of mixq/kernels/kv_quant.py (the reference) and
csrc/attention/kv_format.cuh (the device side):

- "fp16": the activation dtype (fp16 or bf16), row = head_dim values.
- "fp8": float8_e4m3fn, value = stored * per-tensor scale (`k_scale` / `v_scale`, 1.0 by default).
- "q8" / "q4": uint8 rows of head_dim codes (q8) or head_dim/2 bytes (q4) plus fp16 scales
  `[slots, kv_heads, head_dim/32]` (`k_scales` / `v_scales`), Hadamard-rotated per 32 values.

`paged_decode_attention` attends the last Tq tokens of each sequence (q [B, Hq, D], or [B, Tq, Hq, D] for
speculative verification) over its cached tokens; `seq_lens` counts the cached tokens including the new ones,
which must already be written (`paged_cache_write`). CUDA kernel limits (the reference has none): fp16/bf16
activations, head_dim 32, 64 or 128, Tq * Hq / Hkv <= 32, sm_80 or newer; a call is CUDA-graph capturable for a
fixed block-table width (warm it up once before capture).
"""

from __future__ import annotations

import functools

import torch

from mixq.errors import MixqError
from mixq.kernels import ops
from mixq.kernels.attention import attention_mask, sdpa
from mixq.kernels.kv_quant import dequantize_kv, quantize_kv
from mixq.kernels.layers import Rope, apply_rope_ref

_OPS = ("paged_decode_attention", "paged_cache_write")


HEAD_DIMS = (32, 64, 128)  # head sizes the decode kernel is instantiated for


@functools.cache
def _load_ops() -> bool:
    """The attention ops are registered (mixq._C, or the CPU emulation); registers their fake impls once."""
    if not (ops.extension_loaded() and all(hasattr(torch.ops.mixq, name) for name in _OPS)):
        return False
    _register_fakes()
    return True


def available() -> bool:
    """True when the kernels can run here (extension built with the attention ops; a GPU or the CPU emulation)."""
    return ops.cuda_ops_available() and _load_ops()


def use_kernel(where: torch.Tensor | torch.device, head_dim: int) -> bool:
    """Whether decode attention with this head size over a cache on `where` (a tensor or device) uses the kernel."""
    return head_dim in HEAD_DIMS and ops.use_kernel(where) and _load_ops()


def _register_fakes() -> None:
    @torch.library.register_fake("mixq::paged_decode_attention")
    def _decode_fake(q, k_cache, v_cache, block_tables, seq_lens, page_size, scale, window=0, k_scales=None,
                     v_scales=None, k_scale=1.0, v_scale=1.0):  # fmt: skip
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("mixq::paged_cache_write")
    def _write_fake(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None, k_scale=1.0, v_scale=1.0,
                    q=None, cos=None, sin=None):  # fmt: skip
        return None


# ---------------------------------------------------------------------------------------------------------
# Storage formats


def cache_mode(cache: torch.Tensor, act_dtype: torch.dtype, head_dim: int) -> str:
    """Storage mode (`kv_quant.MODES`) of a cache tensor `[slots, kv_heads, row]` for `act_dtype` activations."""
    if cache.dtype == act_dtype and cache.shape[-1] == head_dim:
        return "fp16"
    if cache.dtype == torch.float8_e4m3fn and cache.shape[-1] == head_dim:
        return "fp8"
    if cache.dtype == torch.uint8 and cache.shape[-1] in (head_dim, head_dim // 2):
        return "q8" if cache.shape[-1] == head_dim else "q4"
    raise MixqError(
        f"KV cache tensor {tuple(cache.shape)} {cache.dtype} is not a {act_dtype} / float8_e4m3fn / uint8 (q8, q4) "
        f"cache for head_dim {head_dim}; allocate it with mixq.engine.kv_cache.PagePool"
    )


def _dequant(codes, scales, mode: str, fp8_scale: float) -> torch.Tensor:
    if mode == "fp8":
        scales = torch.tensor(fp8_scale, dtype=torch.float32, device=codes.device)
    return dequantize_kv(codes, scales, mode, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# References


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    window: int | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gather each sequence's pages and run `mixq.kernels.attention.sdpa` (in `compute_dtype`, default q's dtype)."""
    squeeze = q.dim() == 3
    q4 = q.unsqueeze(1) if squeeze else q
    B, Tq, _, D = q4.shape
    mode = cache_mode(k_cache, q.dtype, D)
    cdt = compute_dtype or q.dtype
    window = window if window is not None and window > 0 else None
    out = torch.empty(q4.shape, dtype=q.dtype, device=q.device)
    for b in range(B):
        L = int(seq_lens[b])
        if L < Tq or -(-L // page_size) > block_tables.shape[1]:
            raise MixqError(f"sequence {b}: seq_len {L} needs {Tq}..{block_tables.shape[1] * page_size} tokens")
        pos = torch.arange(L, device=q.device)
        slots = block_tables[b].long().to(q.device)[pos // page_size] * page_size + pos % page_size
        k = _dequant(k_cache[slots], None if k_scales is None else k_scales[slots], mode, k_scale)
        v = _dequant(v_cache[slots], None if v_scales is None else v_scales[slots], mode, v_scale)
        mask = attention_mask(pos[L - Tq :], pos, window)
        out[b] = sdpa(q4[b].to(cdt), k.to(cdt), v.to(cdt), mask, scale).to(q.dtype)
    return out.squeeze(1) if squeeze else out


def paged_cache_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    q: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> None:
    """Store k/v `[N, Hkv, D]` at `slot_mapping` (negative slots are skipped), quantizing for q8/q4/fp8. With RoPE
    tables cos/sin `[N, D]`, k is stored rotated (k itself unchanged) and q `[N, Hq, D]` is rotated in place."""
    if cos is not None:
        k = apply_rope_ref(k, cos, sin)
        if q is not None:
            q.copy_(apply_rope_ref(q, cos, sin))
    mode = cache_mode(k_cache, k.dtype, k.shape[-1])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, cache, scales, s in ((k, k_cache, k_scales, k_scale), (v, v_cache, v_scales, v_scale)):
        codes, sc = quantize_kv(x[keep], mode, s)
        cache[slots] = codes
        if scales is not None:
            scales[slots] = sc


# ---------------------------------------------------------------------------------------------------------
# Dispatch: CUDA op when built and on a GPU, reference otherwise


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    window: int | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Decode attention over a paged cache -> `[B, Hq, D]` (or `[B, Tq, Hq, D]`); see the module docstring."""
    if ops.use_kernel(q) and _load_ops():
        return torch.ops.mixq.paged_decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, page_size, scale, window or 0,
            k_scales, v_scales, k_scale, v_scale,
        )  # fmt: skip
    return paged_decode_attention_ref(
        q, k_cache, v_cache, block_tables, seq_lens, page_size, scale, window, k_scales, v_scales, k_scale, v_scale
    )


def paged_cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    q: torch.Tensor | None = None,
    rope: Rope | None = None,
) -> None:
    """Write this step's k/v `[N, Hkv, D]` into the cache at `slot_mapping` (in place). With `rope` = (cos, sin)
    `[N, D]`, RoPE is applied in the same launch: to k as it is stored and to q `[N, Hq, D]` in place (q is then
    ready for `paged_decode_attention`); see `paged_cache_write_ref`."""
    cos, sin = rope if rope is not None else (None, None)
    if ops.use_kernel(k) and _load_ops():
        if rope is not None:
            cos, sin = cos.to(k.dtype).contiguous(), sin.to(k.dtype).contiguous()
        torch.ops.mixq.paged_cache_write(
            k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping, k_scales, v_scales, k_scale, v_scale,
            q, cos, sin,
        )  # fmt: skip
        return
    paged_cache_write_ref(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales, k_scale, v_scale, q, cos, sin)
