"""Reference attention for one sequence: the causal / sliding-window mask and grouped-query SDPA.

The model's dense path, the paged KV cache and the paged decode kernel's reference all call these, so every
attention path of mixq computes the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk] mask: causal, and within the sliding window if the model has one."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= q_pos[:, None] - k_pos[None, :] < window
    return allowed


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention for one sequence. q: [Tq, H, hd], k/v: [Tk, Hkv, hd] -> [Tq, H, hd]."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)
