"""Reference dequantization and matmul for EXL2 (docs/exl2-format.md section 3.2), pure torch.

fp16 arithmetic is replicated exactly: the loader stores `fp16(q_scale_max / 256)`, the device forms the scale
as `fp16(fp16((code+1)^2) * fp16(max/256))` and the weight as `fp16((q - 2^(b-1)) * scale)`. Each of these
products is exact in fp32 (at most 22 significant bits), so computing it in fp32 and rounding once to fp16
gives the correctly rounded half-precision result the device computes.
"""

from __future__ import annotations

import torch

from mixq.exl2.format import Exl2Tensors
from mixq.exl2.pack import unpack_q_weight, unpack_scales


def group_scales(t: Exl2Tensors) -> torch.Tensor:
    """fp16 scales `[G, N]` exactly as the runtime forms them."""
    codes = unpack_scales(t.q_scale, t.out_features)
    smax = (t.q_scale_max.float() * (1.0 / 256)).half()  # the loader's in-place `*= 1/256` on an fp16 tensor
    return ((codes + 1).square().half().float() * smax.float().unsqueeze(1)).half()


def row_params(t: Exl2Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Per stored row: the fp16 scale row `[K, N]` of its group and the zero point `[K, 1]`."""
    groups = t.groups
    dev = t.q_weight.device
    rows = torch.tensor([g.rows for g in groups], device=dev)
    gidx = torch.repeat_interleave(torch.arange(len(groups), device=dev), rows)
    zero = torch.repeat_interleave(torch.tensor([1 << (g.bits - 1) for g in groups], device=dev), rows)
    return group_scales(t)[gidx], zero.unsqueeze(1)


def dequantize_stored(t: Exl2Tensors) -> torch.Tensor:
    """fp16 `[K, N]` in STORED (act-order) row order."""
    q = unpack_q_weight(t.q_weight, t.group_bits)
    scale, zero = row_params(t)
    return ((q - zero).float() * scale.float()).half()


def dequantize(t: Exl2Tensors, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`W[K, N]` in ORIGINAL input-feature order: row `q_perm[k]` is stored row `k` (= `W_stored[q_invperm]`)."""
    w = dequantize_stored(t)
    return w[t.q_invperm.long()].to(dtype)


def exl2_matmul_ref(x: torch.Tensor, t: Exl2Tensors, w: torch.Tensor | None = None) -> torch.Tensor:
    """`y = x @ W (+ bias)` with fp32 accumulation, returned in x's dtype. `w`: a cached `dequantize(t)`."""
    if w is None:
        w = dequantize(t)
    y = x.float() @ w.float()
    if t.bias is not None:
        y = y + t.bias.float()
    return y.to(x.dtype)
