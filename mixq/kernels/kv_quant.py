"""KV cache quantization: the PyTorch reference of the cache formats (csrc/attention/kv_format.cuh).

Every mode works on head vectors `x[..., head_dim]` and returns `(codes, scales)`:

* ``"fp16"``: no quantization. `codes` is `x` itself in its own dtype (the cache stores the activation
  dtype, fp16 on the GPU), `scales` is an empty tensor.
* ``"q8"`` / ``"q4"`` (exllamav2's Q8/Q4 idea, mixq's exact rounding): each group of 32 consecutive values
  `x` is rotated, `y = H x`, with the unnormalised 32-point Sylvester-Hadamard matrix
  `H[i][j] = (-1)^popcount(i & j)` (`H H = 32 I`), computed in fp32 by the same butterfly as the CUDA
  kernel so both round identically. Then, per group, `scale = fp16(min(max|y| / (qmax u), 65504))`, step
  `u * scale`, and `code = clamp(round_half_even(y / (u scale)) + zero, 0, 2 zero - 1)` with (qmax, zero, u) =
  (127, 128, 1) for q8 and (7, 8, 8) for q4. The code is computed with the fp16-rounded scale, so
  dequantization sees exactly the step that was used. The unit u (a power of two, exact) keeps the fp16
  scale finite for any fp16 input (|y| <= 32 * 65504); the clamp bounds larger (bf16) inputs, whose codes
  then saturate, instead of an inf scale that would dequantize as 0 * inf = NaN. (exllamav2 maps absmax
  to 128 / 8 and clamps; the symmetric qmax here never clips below the clamp.)
  Dequantization: `y' = (code - zero) * u * scale`, `x' = H y' / 32`.
  q8 codes are uint8 `[..., head_dim]`; q4 codes are uint8 `[..., head_dim / 2]` with element 2i in the
  low nibble and 2i+1 in the high nibble; scales are fp16 `[..., head_dim / 32]`.
  Error bound per 32-group: `||x - x'||_2 <= u scale / 2` below the clamp (rotation error
  `|y - y'| <= u scale / 2` per element, and `H / sqrt(32)` is orthogonal), plus fp32 rounding.
* ``"fp8"``: float8 e4m3 with ONE per-tensor scale (as the kernels take it, `k_scale`/`v_scale`):
  `code = e4m3(clamp(x * (1 / scale), -448, 448))` rounded to nearest even, `x' = code * scale`. The scale
  is given (a cache fixes it up front; 1.0 by default) or, if None, `max|x| / 448` of this tensor.
  `scales` is a 0-d fp32 tensor. Relative error <= 2^-4 for normal values, absolute <= 2^-10 * scale below.
"""

from __future__ import annotations

import torch

from mixq.errors import MixqError

MODES = ("fp16", "q8", "q4", "fp8")
GROUP = 32
FP8_MAX = 448.0
_Q = {"q8": (127.0, 128), "q4": (7.0, 8)}  # (qmax, zero code)
SCALE_UNIT = {"q8": 1.0, "q4": 8.0}  # step = unit * stored fp16 scale (csrc/attention/kv_format.cuh kScaleUnit)
FP16_MAX = 65504.0


def check_mode(mode: str, head_dim: int | None = None) -> None:
    if mode not in MODES:
        raise MixqError(f"--cache {mode}: unknown KV cache mode; use one of {', '.join(MODES)}")
    if head_dim is not None and mode in _Q and head_dim % GROUP:
        raise MixqError(f"--cache {mode}: head_dim {head_dim} is not a multiple of {GROUP}; use --cache fp16 or fp8")


def bytes_per_value(mode: str) -> float:
    """Cache bytes per stored K or V element, scales included (fp8's per-tensor scale is negligible)."""
    check_mode(mode)
    return {"fp16": 2.0, "q8": 1.0 + 2 / GROUP, "q4": 0.5 + 2 / GROUP, "fp8": 1.0}[mode]


def code_width(mode: str, head_dim: int) -> int:
    """Last dimension of the stored codes for one head vector."""
    return head_dim // 2 if mode == "q4" else head_dim


def code_dtype(mode: str, native: torch.dtype) -> torch.dtype:
    return {"fp16": native, "fp8": torch.float8_e4m3fn}.get(mode, torch.uint8)


def hadamard32(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised 32-point Hadamard transform over the last dimension (size 32), fp32 butterfly."""
    lane = torch.arange(GROUP, device=x.device)
    for s in (1, 2, 4, 8, 16):
        y = x[..., lane ^ s]
        x = torch.where((lane & s).bool(), y - x, x + y)
    return x


def quantize_kv(
    x: torch.Tensor, mode: str, fp8_scale: float | torch.Tensor | None = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head vectors `x[..., head_dim]` -> (codes, scales) in the format of `mode` (see the module docstring)."""
    check_mode(mode, x.shape[-1])
    if mode == "fp16":
        return x, torch.empty(0, dtype=torch.float16, device=x.device)
    if mode == "fp8":
        xf = x.float()
        if fp8_scale is None:
            fp8_scale = xf.abs().amax().clamp_min(1e-12) / FP8_MAX
        scale = torch.as_tensor(fp8_scale, dtype=torch.float32, device=x.device)
        codes = (xf * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes, scale
    qmax, zero = _Q[mode]
    lead, D = x.shape[:-1], x.shape[-1]
    y = hadamard32(x.float().reshape(*lead, D // GROUP, GROUP))
    u = SCALE_UNIT[mode]
    scale = (y.abs().amax(-1) / (qmax * u)).clamp(max=FP16_MAX).to(torch.float16)
    s = scale.float()[..., None] * u
    q = torch.where(s > 0, torch.round(y / torch.where(s > 0, s, 1.0)) + zero, float(zero))
    q = q.clamp(0, 2 * zero - 1).to(torch.uint8).reshape(*lead, D)
    if mode == "q4":
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv`: `[..., head_dim]` values in `dtype`."""
    check_mode(mode)
    if mode == "fp16":
        return codes.to(dtype)
    if mode == "fp8":
        return (codes.float() * scales.float()).to(dtype)
    _, zero = _Q[mode]
    if mode == "q4":
        c = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
    else:
        c = codes
    lead, D = c.shape[:-1], c.shape[-1]
    y = (c.float() - zero).reshape(*lead, D // GROUP, GROUP) * (scales.float()[..., None] * SCALE_UNIT[mode])
    return (hadamard32(y) * (1.0 / GROUP)).reshape(*lead, D).to(dtype)
