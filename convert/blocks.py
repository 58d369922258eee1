"""One decoder layer at a time: block forwards over calibration rows, and Hessian capture.

A layer is the runtime's own `DecoderLayer` (built by the loader for one layer index only), so the
converter measures exactly the math the runtime runs. Linear inputs are captured with forward
pre-hooks on the layer's linear modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.model.mixtral import DecoderLayer, DenseCausalContext, rope_cos_sin


def attn_block(layer: DecoderLayer, x: torch.Tensor, rope_theta: float, window: int | None) -> torch.Tensor:
    """x [B, T, H] -> x + attention(norm(x)) (the residual stream after the attention block)."""
    B, T, H = x.shape
    ctx = DenseCausalContext(B, T, x.device, window)
    attn = layer.self_attn
    cos, sin = rope_cos_sin(ctx.positions, attn.head_dim, rope_theta, x.dtype)
    flat = x.reshape(B * T, H)
    return (flat + attn(layer.input_layernorm(flat), cos, sin, ctx)).view(B, T, H)


def moe_block(layer: DecoderLayer, h: torch.Tensor) -> torch.Tensor:
    """h [B, T, H] -> h + moe(norm(h))."""
    B, T, H = h.shape
    flat = h.reshape(B * T, H)
    return (flat + layer.block_sparse_moe(layer.post_attention_layernorm(flat))).view(B, T, H)


def batched(fn, x: torch.Tensor, rows_per_batch: int) -> torch.Tensor:
    """Apply a row-wise block function in slices of rows to bound activation memory."""
    return torch.cat([fn(x[i : i + rows_per_batch]) for i in range(0, x.shape[0], rows_per_batch)])


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise MixqError(
            f"{what} contains NaN or inf; the source weights or the calibration overflow "
            "(try --device cpu with float32, or check the checkpoint)"
        )


class HessianSet:
    """Σ xᵀx per named input (fp32, on the layer's device), with the number of tokens seen."""

    def __init__(self):
        self.H: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if name not in self.H:
            self.H[name] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            self.tokens[name] = 0
        self.H[name].addmm_(x.T, x)
        self.tokens[name] += x.shape[0]

    def get(self, name: str, dim: int, device) -> torch.Tensor:
        """The mean Hessian; an identity when no token reached this input (round-to-nearest behaviour)."""
        if self.tokens.get(name, 0) == 0:
            return torch.eye(dim, device=device)
        return self.H[name] / self.tokens[name]


@contextmanager
def capture(modules: dict[str, nn.Module], hs: HessianSet) -> Iterator[None]:
    """Accumulate the input of each named module into `hs` while the context is open."""
    handles = [m.register_forward_pre_hook(lambda _m, args, n=name: hs.add(n, args[0])) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attn_linears(layer: DecoderLayer) -> dict[str, nn.Module]:
    a = layer.self_attn
    return {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj}


def expert_linears(layer: DecoderLayer) -> dict[str, nn.Module]:
    return {
        f"{e}.{w}": getattr(ex, w) for e, ex in enumerate(layer.block_sparse_moe.experts) for w in ("w1", "w3", "w2")
    }
