"""Measure and quantize one decoder layer.

Hessians:
- q/k/v share one Hessian from the post-norm attention input; o_proj has its own.
- w2 of each expert: the intermediate activations of the tokens routed to that expert.
- w1/w3: exllamav2 shares ONE Hessian over all tokens of the layer for every expert ("shared"). mixq can
  also use each expert's routed tokens ("routed"), blended with the shared Hessian with a weight of
  `ROUTED_PRIOR_TOKENS` tokens so that experts that see few tokens fall back smoothly to "shared".
  With `moe_hessian="auto"` the measurement pass quantizes the layer's w1/w3 both ways at a 4-bit
  reference recipe and keeps whichever gives the lower MoE block error (recorded in measurement.json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mixq.errors import MixqError
from mixq.exl2.gptq import gptq_quantize, rtn_quantize
from mixq.exl2.qparams import QParams
from mixq.exl2.reference import dequantize
from mixq.model.mixtral import DecoderLayer

from .blocks import (
    HessianSet,
    attn_block,
    attn_linears,
    batched,
    capture,
    check_finite,
    expert_linears,
    moe_block,
)
from .hostmem import release_free_memory

ROUTED_PRIOR_TOKENS = 256
ROWS_PER_BATCH = 4


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of ‖y − ref‖_F / ‖ref‖_F (exllamav2's block accuracy is 1 − this)."""
    d = (y.float() - ref.float()).flatten(1).norm(dim=1)
    return (d / ref.float().flatten(1).norm(dim=1).clamp_min(1e-12)).mean().item()


def recipe_key(qp: QParams) -> str:
    return json.dumps(qp.to_dict(), sort_keys=True)


@dataclass
class LayerStats:
    attn: HessianSet = field(default_factory=HessianSet)
    moe: HessianSet = field(default_factory=HessianSet)


class LayerQuantizer:
    """Holds one layer, its float weights, and a cache of GPTQ results keyed by (matrix, recipe, Hessian)."""

    def __init__(self, layer: DecoderLayer, index: int, rope_theta: float, window: int | None, method: str = "gptq"):
        self.layer, self.index, self.rope_theta, self.window = layer, index, rope_theta, window
        self.method = method  # "gptq", or "rtn" (round-to-nearest baseline, same scales and act-order)
        self.attn_mods = attn_linears(layer)
        self.expert_mods = expert_linears(layer)
        self.float_w = {n: m.weight.data.clone() for n, m in {**self.attn_mods, **self.expert_mods}.items()}
        self._cache: dict[tuple[str, str, str], object] = {}
        # Called with a count of finished steps (one attention candidate, one expert at one recipe, one matrix
        # quantized): the converter's progress bar (see `steps`).
        self.tick: Callable[[int], None] = lambda n: None

    @staticmethod
    def steps(n_experts: int, attn_candidates: int = 0, moe_candidates: int = 0, auto_w13: bool = False) -> int:
        """Steps `tick` counts per layer: measurement (with the candidate counts) or quantization (without)."""
        if attn_candidates or moe_candidates:
            return attn_candidates + n_experts * moe_candidates + (2 * n_experts if auto_w13 else 0)
        return 4 + n_experts

    # ----- forwards -------------------------------------------------------------------------------------
    def attn(self, x: torch.Tensor) -> torch.Tensor:
        return batched(lambda r: attn_block(self.layer, r, self.rope_theta, self.window), x, ROWS_PER_BATCH)

    def moe(self, h: torch.Tensor) -> torch.Tensor:
        return batched(lambda r: moe_block(self.layer, r), h, ROWS_PER_BATCH)

    def restore(self, names=None) -> None:
        for n in names or self.float_w:
            mod = self.attn_mods.get(n) or self.expert_mods[n]
            mod.weight.data.copy_(self.float_w[n])

    # ----- Hessians -------------------------------------------------------------------------------------
    def attn_hessians(self, x: torch.Tensor) -> tuple[HessianSet, torch.Tensor]:
        hs = HessianSet()
        with capture({"qkv": self.attn_mods["q_proj"], "o": self.attn_mods["o_proj"]}, hs):
            h = self.attn(x)
        check_finite(h, f"layer {self.index} attention output")
        return hs, h

    def moe_hessians(self, h: torch.Tensor) -> tuple[HessianSet, torch.Tensor]:
        hs = HessianSet()
        mods = {"shared": self.layer.block_sparse_moe.gate}
        mods.update({f"{e}.w13": ex.w1 for e, ex in enumerate(self.layer.block_sparse_moe.experts)})
        mods.update({f"{e}.w2": ex.w2 for e, ex in enumerate(self.layer.block_sparse_moe.experts)})
        with capture(mods, hs):
            out = self.moe(h)
        check_finite(out, f"layer {self.index} MoE output")
        return hs, out

    def hessian_for(self, name: str, hs: HessianSet, moe_hessian: str) -> tuple[torch.Tensor, str]:
        """The Hessian to quantize matrix `name` with, and a short tag for the cache key."""
        W = self.float_w[name]
        K, dev = W.shape[1], W.device
        if name in ("q_proj", "k_proj", "v_proj"):
            return hs.get("qkv", K, dev), "qkv"
        if name == "o_proj":
            return hs.get("o", K, dev), "o"
        e, w = name.split(".")
        if w == "w2":
            return hs.get(f"{e}.w2", K, dev), "w2"
        shared = hs.get("shared", K, dev)
        if moe_hessian == "shared":
            return shared, "shared"
        n = hs.tokens.get(f"{e}.w13", 0)
        routed = hs.H[f"{e}.w13"] if n else torch.zeros_like(shared)
        return (routed + ROUTED_PRIOR_TOKENS * shared) / (n + ROUTED_PRIOR_TOKENS), "routed"

    # ----- quantization ---------------------------------------------------------------------------------
    def quantize(self, name: str, qp: QParams, hs: HessianSet, moe_hessian: str = "shared"):
        H, tag = self.hessian_for(name, hs, moe_hessian)
        key = (name, recipe_key(qp), tag)
        if key not in self._cache:
            W = self.float_w[name].float()
            self._cache[key] = gptq_quantize(W, H, qp) if self.method == "gptq" else rtn_quantize(W, qp, H=H)
        return self._cache[key]

    def apply(self, name: str, result) -> None:
        mod = self.attn_mods.get(name) or self.expert_mods[name]
        mod.weight.data.copy_(result.fake.to(mod.weight.dtype))

    def clear_cache(self) -> None:
        self._cache.clear()

    # ----- measurement ----------------------------------------------------------------------------------
    def measure_attn(self, x: torch.Tensor, candidates: list[dict[str, QParams]]) -> tuple[list[dict], torch.Tensor]:
        hs, ref = self.attn_hessians(x)
        entries = []
        for row in candidates:
            bits = 0
            for name, qp in row.items():
                self.apply(name, self.quantize(name, qp, hs))
                W = self.float_w[name]
                bits += qp.total_bits(W.shape[1], W.shape[0])
            err = rel_error(self.attn(x), ref)
            entries.append(
                {"accuracy": max(1e-6, 1 - err), "total_bits": bits, **{n: qp.to_dict() for n, qp in row.items()}}
            )
            self.tick(1)
        self.restore(list(self.attn_mods))
        self.clear_cache()
        return entries, ref

    def measure_moe(
        self, h: torch.Tensor, candidates: list[dict[str, QParams]], moe_hessian: str = "auto"
    ) -> tuple[list[dict], str, torch.Tensor]:
        hs, ref = self.moe_hessians(h)
        n_exp = len(self.layer.block_sparse_moe.experts)
        if moe_hessian == "auto":
            moe_hessian = self._choose_w13_hessian(h, ref, hs, candidates, n_exp)
        entries = []
        for row in candidates:
            bits = 0
            for e in range(n_exp):
                for w, qp in row.items():
                    name = f"{e}.{w}"
                    self.apply(name, self.quantize(name, qp, hs, moe_hessian))
                    W = self.float_w[name]
                    bits += qp.total_bits(W.shape[1], W.shape[0])
                self.tick(1)
            err = rel_error(self.moe(h), ref)
            entries.append(
                {"accuracy": max(1e-6, 1 - err), "total_bits": bits, **{w: qp.to_dict() for w, qp in row.items()}}
            )
        self.restore(list(self.expert_mods))
        self.clear_cache()
        return entries, moe_hessian, ref

    def _choose_w13_hessian(self, h, ref, hs, candidates, n_exp) -> str:
        """Quantize only w1/w3 at the candidate nearest 4 bpw with each statistic; keep the lower error."""
        row = min(candidates, key=lambda r: abs(r["w1"].bpw(*self.float_w["0.w1"].shape[::-1]) - 4.0))
        errs = {}
        for mode in ("shared", "routed"):
            for e in range(n_exp):
                for w in ("w1", "w3"):
                    self.apply(f"{e}.{w}", self.quantize(f"{e}.{w}", row[w], hs, mode))
                self.tick(1)
            errs[mode] = rel_error(self.moe(h), ref)
        self.restore(list(self.expert_mods))
        return min(errs, key=errs.get)

    # ----- quantization pass ----------------------------------------------------------------------------
    def quantize_layer(
        self, x: torch.Tensor, attn_row: dict[str, QParams], moe_row: dict[str, QParams], moe_hessian: str
    ) -> tuple[dict[str, object], torch.Tensor, dict[str, float]]:
        """GPTQ every matrix with its chosen recipe. Returns (name -> Exl2Tensors, next hidden, errors)."""
        out: dict[str, object] = {}
        hs, ref_h = self.attn_hessians(x)
        for name, qp in attn_row.items():
            out[name] = self._final(name, qp, hs, "shared")
            self.tick(1)
        h = self.attn(x)
        attn_err = rel_error(h, ref_h)
        hs, _ = self.moe_hessians(h)
        self.restore(list(self.expert_mods))
        ref_out = self.moe(h)
        for e in range(len(self.layer.block_sparse_moe.experts)):
            for w, qp in moe_row.items():
                out[f"{e}.{w}"] = self._final(f"{e}.{w}", qp, hs, moe_hessian)
            release_free_memory()
            self.tick(1)
        x_next = self.moe(h)
        check_finite(x_next, f"layer {self.index} output")
        return out, x_next, {"attn_err": attn_err, "moe_err": rel_error(x_next, ref_out)}

    def _final(self, name: str, qp: QParams, hs: HessianSet, moe_hessian: str):
        res = self.quantize(name, qp, hs, moe_hessian)
        # Check the packed layer: dequantizing it again must give the quantizer's own weights.
        W = dequantize(res.exl2, dtype=torch.float32).T
        diff = (W.to(res.fake.device) - res.fake.float()).abs().max().item()
        if diff > 1e-3:
            raise MixqError(
                f"layer {self.index} {name}: packed weights differ from the quantizer's by {diff:.3g}; "
                "this is a mixq bug, please report it"
            )
        self.apply(name, res)
        return res.exl2
