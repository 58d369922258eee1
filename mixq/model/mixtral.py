"""Reference Mixtral in plain PyTorch (runs on CPU and GPU).

The model works on a flat batch of tokens `[N, hidden]`; how attention sees the other tokens (a dense
causal batch, or sequences in a paged KV cache) is decided by the `AttentionContext` passed in. Module
names mirror the Hugging Face hub layout so checkpoints load by name. Linear layers are any module that
maps `[..., K] -> [..., N]`: a `DenseLinear` for fp16/bf16/fp32 weights, an `Exl2Linear` for EXL2.
"""

from __future__ import annotations

import functools
import itertools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mixq.kernels import layers, moe, ops
from mixq.kernels.attention import attention_mask, sdpa
from mixq.kernels.layers import Rope
from mixq.kernels.moe import PreparedMoE
from mixq.model.config import MixtralConfig
from mixq.model.exl2_linear import Exl2Linear, linear_group
from mixq.model.fused_experts import FusedExperts


class DenseLinear(nn.Module):
    """y = x @ W^T with W stored [out, in] as in Hugging Face checkpoints."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm(x), fp32 statistics as in transformers (`layers.rms_norm_ref`); one kernel on the kernel device."""
        return layers.rms_norm(x, self.weight, self.eps)[0]

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual): the residual add fused into the norm (one kernel)."""
        return layers.rms_norm(x, self.weight, self.eps, residual)


@functools.cache
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE's inverse frequencies, as transformers computes them; the same every step, so built once per device (a
    decode step then spends 6 small launches on its tables, not 10). First built eagerly: a prefill, or the decode
    graphs' warm-up, runs before any capture."""
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables `[N, head_dim]` for the given positions (HF's rotate-half convention)."""
    # int64 positions times fp32 frequencies: the product is fp32 (the cast happens inside the multiply, one launch).
    freqs = positions[:, None] * _inv_freq(head_dim, float(theta), positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class AttentionContext(Protocol):
    """Where keys/values live. `attend` stores this step's k/v (if cached) and returns attention output."""

    positions: torch.Tensor  # [N] int64, absolute position of each token

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rope: Rope | None = None
    ) -> torch.Tensor:
        """q: [N, heads, hd], k/v: [N, kv_heads, hd] -> [N, heads, hd]. `rope`: the tables of the RoPE still to
        apply to q and k (`layers.rope_qk`; a paged decode step applies it inside its cache write); None: applied."""
        ...


class DenseCausalContext:
    """Full forward over a `[B, T]` batch without a cache (every row starts at position 0)."""

    def __init__(self, batch: int, seqlen: int, device: torch.device, window: int | None):
        self.batch, self.seqlen = batch, seqlen
        pos = torch.arange(seqlen, device=device)
        self.positions = pos.repeat(batch)
        self.mask = attention_mask(pos, pos, window)

    def attend(self, layer: int, q, k, v, scale: float, rope: Rope | None = None) -> torch.Tensor:
        q, k = layers.rope_qk(q, k, rope)
        B, T = self.batch, self.seqlen
        outs = [
            sdpa(q[b * T : (b + 1) * T], k[b * T : (b + 1) * T], v[b * T : (b + 1) * T], self.mask, scale)
            for b in range(B)
        ]
        return torch.cat(outs, dim=0)


class Attention(nn.Module):
    def __init__(self, cfg: MixtralConfig, layer: int, q_proj, k_proj, v_proj, o_proj):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = linear_group([self.q_proj, self.k_proj, self.v_proj], x)  # one launch on the kernels
        q, k, v = q.view(n, self.n_heads, self.head_dim), k.view(n, self.n_kv, -1), v.view(n, self.n_kv, -1)
        out = ctx.attend(self.layer, q, k, v, self.scale, rope=(cos, sin))
        return self.o_proj(out.reshape(n, self.n_heads * self.head_dim))


class Expert(nn.Module):
    def __init__(self, w1, w2, w3):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routed experts. Reference path: loop over the experts that received tokens.

    On the kernel device the experts are stacked once for the grouped kernels (`fuse`: by the loader, else on
    the first forward there) and the per-expert modules are released: memory holds the experts once, as the
    buffers of `fused_experts`, and the reference path then reads the same stack (`moe.moe_experts_ref`).
    """

    def __init__(self, cfg: MixtralConfig, gate: DenseLinear, experts: list[Expert]):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = len(experts)
        self.gate = gate
        self.experts = nn.ModuleList(experts)  # emptied once fused
        self.fused_experts: FusedExperts | None = None
        # The kernels' view of fused_experts (a PreparedMoE); False: the fused path does not apply; None: not tried.
        self._fused: PreparedMoE | bool | None = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # The stack moved with the module, so the view follows; a layer never fused tries again on its new device.
        self._fused = None if self.fused_experts is None else self.fused_experts.prepared()
        return self

    def fuse(self, device: torch.device) -> bool:
        """Stack the experts for the grouped kernels on `device` and release the per-expert modules. False (experts
        left as they are) when the kernels do not run on `device` or cannot take these experts.

        EXL2 experts are staged in host memory first (a no-op for the loader, which builds them there), so that the
        device holds at most this layer's stack and `prepare_moe`'s per-expert repack above the final figure."""
        if self.fused_experts is not None:
            return True
        if not self.experts or not ops.use_kernel(device):
            return False
        self._fused = False
        home = next(itertools.chain(self.experts.parameters(), self.experts.buffers())).device
        if all(isinstance(m, Exl2Linear) for ex in self.experts for m in (ex.w1, ex.w2, ex.w3)):
            self.experts.cpu()
        p = moe.prepare_for_model(list(self.experts), device)
        if p is None:
            self.experts.to(home)
            return False
        self.fused_experts = FusedExperts(p)
        self.experts = nn.ModuleList()
        self._fused = self.fused_experts.prepared()
        return True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weights, ids = moe.router(x, self.gate.weight, self.top_k)  # one launch on the kernel device
        if self._fused is None and ops.use_kernel(x):
            self.fuse(x.device)
        if self._fused:
            if ops.use_kernel(x):
                return moe.moe_experts(x, weights, ids, self._fused, residual=residual)
            return moe.moe_experts_ref(x, weights, ids, self._fused, residual=residual)
        out = torch.zeros_like(x)
        # One host sync per layer (which experts are hit); the CUDA kernels replace this path.
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            y = self.experts[e](x[tok]) * weights[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out if residual is None else out + residual


class DecoderLayer(nn.Module):
    def __init__(
        self,
        input_layernorm: RMSNorm,
        self_attn: Attention,
        post_attention_layernorm: RMSNorm,
        block_sparse_moe: SparseMoE,
    ):
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.block_sparse_moe = post_attention_layernorm, block_sparse_moe

    def forward(self, h: torch.Tensor, cos, sin, ctx: AttentionContext) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        n2, h = self.post_attention_layernorm.forward_add(a, h)  # h + a, and its norm, in one kernel
        return self.block_sparse_moe(n2, residual=h)


class MixtralModel(nn.Module):
    def __init__(self, embed_tokens: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(embed_tokens, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class Mixtral(nn.Module):
    """`Mixtral(ids [B, T]) -> logits [B, T, vocab]` (full forward, no cache); `forward_tokens` for caches."""

    def __init__(self, cfg: MixtralConfig, model: MixtralModel, lm_head: nn.Module):
        super().__init__()
        self.config = cfg
        self.model = model
        self.lm_head = lm_head

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def forward_tokens(self, ids: torch.Tensor, ctx: AttentionContext, logits_at: torch.Tensor | None = None):
        """ids: [N] flat tokens. Returns logits [N, vocab], or only at the `logits_at` row indices."""
        cfg = self.config
        h = self.model.embed_tokens(ids.to(self.model.embed_tokens.weight.device)).to(self.device, self.dtype)
        cos, sin = rope_cos_sin(ctx.positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, ctx)
        if logits_at is not None:
            h = h[logits_at]
        return self.lm_head(self.model.norm(h))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        ctx = DenseCausalContext(B, T, self.device, self.config.sliding_window)
        return self.forward_tokens(ids.reshape(-1).to(self.device), ctx).view(B, T, -1)
