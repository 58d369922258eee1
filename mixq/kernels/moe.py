"""The grouped EXL2 expert matmul of one MoE layer: load-time stacking of the experts (`prepare_moe`), the fused
CUDA path (`moe_experts` / `moe_forward`), its pure-torch reference (`moe_experts_ref` / `moe_forward_ref`), and
the fake impls of `torch.ops.mixq.moe_gate_up / moe_down / moe_finalize` (csrc/moe/).

Paths of `moe_experts` on CUDA, all deterministic (split-K partials summed in split order by the last CTA of each
tile, whichever it is; the only atomics are its arrival counters):
- decode, T <= 8 tokens: one gate+up launch and one down launch over every active expert (SiLU * up, the routing
  weights, the top-k sum and the residual in their epilogues); each CTA derives its expert and rows from the top-k
  ids on the device. No host sync, CUDA-graph capturable.
- small prefill (T * k <= `dense_rows_per_expert` * E): `moe_align` (device) groups the assignments into
  8-row blocks, then the same two kernels and `finalize_kernel`. No host sync, capturable; weights are re-read per
  8-row block.
- large prefill: `moe_align`, then ONE host sync (the per-expert counts, to size the dense matmuls), per
  active expert dequantize + torch.matmul on its contiguous rows, and the `moe_finalize` kernel (un-permute,
  weighted top-k sum, optional residual). Not capturable.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixq.errors import FormatError, MixqError
from mixq.exl2.format import Exl2Tensors
from mixq.exl2.layout import PreparedExl2, prepare_exl2
from mixq.kernels import ops

log = logging.getLogger("mixq")

DECODE_MAX_TOKENS = 8  # decode mode: every expert's rows fit one block of <= 8 rows
PREFILL_BLOCK_M = 8  # rows per block of the aligned (prefill) mode
# Above this many assignments per expert on average, dequantize + torch.matmul (same rule as exl2_matmul's 32).
DEFAULT_DENSE_ROWS_PER_EXPERT = 32


@dataclass
class StackedExl2:
    """One projection (w1, w3 or w2) of all E experts in the kernels' layout, stacked along a leading expert
    dimension: expert `e`'s buffers start at `e * stride` of the flat buffers (`offsets()`). All experts share
    one K schedule (same `q_groups`), checked by `prepare_moe`."""

    qweight: torch.Tensor  # int32 [E, word rows, N]
    qscale: torch.Tensor  # int32 [E, G, N / 8]
    scale_max: torch.Tensor  # fp16 [E, G]
    tile_group: torch.Tensor  # int32 [E, K / 32]
    perm: torch.Tensor | None  # int32 [E, K]; None when the input arrives in stored order
    input_perm: torch.Tensor  # int32 [E, K], the act-order permutation of each expert (also when folded)
    col_order: torch.Tensor | None  # int64 [E, N], output columns folded in (w1/w3: w2's act-order)
    seg_bits: tuple[int, ...]
    seg_rows: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return sum(self.seg_rows)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[2]

    def offsets(self) -> dict[str, list[int]]:
        """Start of each expert (and the end) in the flat buffers, in elements."""
        bufs = {"qweight": self.qweight, "qscale": self.qscale, "scale_max": self.scale_max}
        bufs["tile_group"] = self.tile_group
        return {k: [e * v[0].numel() for e in range(self.num_experts + 1)] for k, v in bufs.items()}

    def expert(self, e: int) -> PreparedExl2:
        """Expert `e` as a `PreparedExl2` of views into the stacked buffers."""
        return PreparedExl2(
            qweight=self.qweight[e],
            qscale=self.qscale[e],
            scale_max=self.scale_max[e],
            tile_group=self.tile_group[e],
            perm=None if self.perm is None else self.perm[e],
            input_perm=self.input_perm[e],
            seg_bits=self.seg_bits,
            seg_rows=self.seg_rows,
            bias=None,
            col_order=None if self.col_order is None else self.col_order[e],
        )

    def args(self, with_perm: bool = True) -> tuple:
        t = (self.qweight, self.qscale, self.scale_max, self.tile_group)
        return (*t, self.perm) if with_perm else t

    def schedule(self) -> tuple[list[int], list[int]]:
        return list(self.seg_bits), list(self.seg_rows)


@dataclass
class PreparedMoE:
    """The experts of one MoE layer for the grouped kernels. w1/w3 output columns come out in w2's stored row
    order (w2's act-order folded), so w2 reads the intermediate without a gather. When all experts' w1 and w3
    share one act-order permutation, it is folded too: `x_perm` is applied to x as the gate/up kernel stages it
    (a permutation shared by every expert), so no gather runs before it."""

    w1: StackedExl2
    w3: StackedExl2
    w2: StackedExl2
    x_perm: torch.Tensor | None  # int32 [H]; the kernels gather x through it as they stage it

    @property
    def num_experts(self) -> int:
        return self.w1.num_experts

    @property
    def hidden_size(self) -> int:
        return self.w1.in_features

    @property
    def intermediate_size(self) -> int:
        return self.w1.out_features

    @property
    def device(self) -> torch.device:
        return self.w1.qweight.device


def _stack(ps: list[PreparedExl2]) -> StackedExl2:
    def st(name: str) -> torch.Tensor:
        return torch.stack([getattr(p, name) for p in ps]).contiguous()

    return StackedExl2(
        qweight=st("qweight"),
        qscale=st("qscale"),
        scale_max=st("scale_max"),
        tile_group=st("tile_group"),
        perm=None if ps[0].perm is None else st("perm"),
        input_perm=st("input_perm"),
        col_order=None if ps[0].col_order is None else st("col_order"),
        seg_bits=ps[0].seg_bits,
        seg_rows=ps[0].seg_rows,
    )


def prepare_moe(experts: list, device: torch.device | str | None = None) -> PreparedMoE:
    """Stack the EXL2 w1/w3/w2 of `experts` (each an `Expert` of `Exl2Linear`s) for the grouped kernels.

    Raises FormatError when the kernels cannot take them (not EXL2, bias, differing shapes or K schedules).
    """
    if not experts:
        raise FormatError("prepare_moe: no experts")
    for i, ex in enumerate(experts):
        for name in ("w1", "w3", "w2"):
            # Any layer that exposes its EXL2 tensors as `.exl2` (the model's Exl2Linear): the kernels sit below
            # the model, so they look at the tensors, not at the module's class.
            if not isinstance(getattr(getattr(ex, name, None), "exl2", None), Exl2Tensors):
                raise FormatError(f"experts.{i}.{name}: not an EXL2 layer; the fused MoE path needs EXL2 experts")
            if getattr(ex, name).bias is not None:
                raise FormatError(f"experts.{i}.{name}: has a bias; the fused MoE path supports none")
    ts = {name: [getattr(ex, name).exl2 for ex in experts] for name in ("w1", "w3", "w2")}
    for name, tl in ts.items():
        for i, t in enumerate(tl):
            if t.group_bits != tl[0].group_bits or t.out_features != tl[0].out_features:
                raise FormatError(
                    f"experts.{i}.{name}: shape or q_groups differ from experts.0.{name}; "
                    "the fused MoE path needs one K schedule per projection"
                )
    H, inter = ts["w1"][0].in_features, ts["w1"][0].out_features
    if ts["w3"][0].in_features != H or ts["w3"][0].out_features != inter or ts["w2"][0].in_features != inter:
        raise FormatError("experts.0: w1 [H, I], w3 [H, I] and w2 [I, H] shapes do not fit together")
    if ts["w2"][0].out_features != H or len(experts) > 64:
        raise FormatError(f"experts: w2 must map back to {H} features and there may be at most 64 experts")
    dev = torch.device(device) if device is not None else ts["w1"][0].q_weight.device
    w2 = [prepare_exl2(t, dev, fold_perm=True) for t in ts["w2"]]
    inv = [t.q_invperm.to(dev) for t in ts["w1"] + ts["w3"]]
    shared = all(torch.equal(v, inv[0]) for v in inv[1:])
    w1 = [prepare_exl2(t, dev, fold_perm=shared, col_order=p.input_perm) for t, p in zip(ts["w1"], w2)]
    w3 = [prepare_exl2(t, dev, fold_perm=shared, col_order=p.input_perm) for t, p in zip(ts["w3"], w2)]
    x_perm = w1[0].input_perm.to(torch.int32) if shared else None
    return PreparedMoE(w1=_stack(w1), w3=_stack(w3), w2=_stack(w2), x_perm=x_perm)


# ---------------------------------------------------------------- forward


def decode_block_m(tokens: int) -> int:
    return 1 if tokens <= 1 else 2 if tokens <= 2 else 4 if tokens <= 4 else 8


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    p: PreparedMoE,
    *,
    residual: torch.Tensor | None = None,
    ctas: int = 0,
    dense_rows_per_expert: int = DEFAULT_DENSE_ROWS_PER_EXPERT,
) -> torch.Tensor:
    """`y[t] = sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t]) (+ residual)`, in x's dtype.

    x `[T, H]` in original feature order; expert(x) = w2(silu(w1 x) * w3 x). On CUDA with mixq._C: the
    grouped kernels (fp16 or bf16 activations in and out, multiplied in fp16, fp32 accumulation; fp32 inputs
    go through `ops.to_half`); elsewhere `moe_experts_ref`. `ctas` > 0 forces the kernels' persistent grid
    (csrc/moe/moe_kernels.h MoePlan; 0: the plan's one wave).
    """
    if not ops.use_kernel(x):
        return moe_experts_ref(x, topk_weights, topk_ids, p, residual=residual)
    T, k = topk_ids.shape
    E = p.num_experts
    xa = (x if x.dtype in ops.ACT_DTYPES else ops.to_half(x)).contiguous()  # the kernels' activation type
    ids = topk_ids.to(torch.int32).contiguous()  # the fused router's ids already are
    w = topk_weights.to(torch.float32).contiguous()
    res = None if residual is None else residual.to(xa.dtype).contiguous()
    if T <= DECODE_MAX_TOKENS:
        bm, sorted_ids, block_expert, positions = decode_block_m(T), None, None, None
    elif T * k <= dense_rows_per_expert * E:
        bm = PREFILL_BLOCK_M
        al = ops.moe_align(ids, E, bm)
        sorted_ids, block_expert, positions = al.sorted_ids, al.block_expert, al.positions
    else:
        x16 = ops.to_half(xa)
        xk = x16[:, p.x_perm] if p.x_perm is not None else x16
        return _moe_dense(xk, w, ids, p, None if res is None else ops.to_half(res)).to(x.dtype)
    C = torch.ops.mixq
    w1b, w1r = p.w1.schedule()
    w3b, w3r = p.w3.schedule()
    w2b, w2r = p.w2.schedule()
    # A shared act-order permutation goes in as a [1, H] perm: the kernel gathers x through it while staging.
    shared = None if p.x_perm is None else p.x_perm[None]
    w1a = p.w1.args() if shared is None else (*p.w1.args(False), shared)
    w3a = p.w3.args() if shared is None else (*p.w3.args(False), shared)
    inter = C.moe_gate_up(xa, ids, sorted_ids, block_expert, bm, *w1a, w1b, w1r, *w3a, w3b, w3r, ctas)
    y = C.moe_down(
        inter, w, ids, sorted_ids, block_expert, positions, bm, *p.w2.args(False), w2b, w2r, res, ctas, xa.dtype
    )
    return y.to(x.dtype)


def _moe_dense(
    xk: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, p: PreparedMoE, res: torch.Tensor | None
) -> torch.Tensor:
    """Long prompts: per active expert, dequantize and torch.matmul its contiguous rows; the counts are read
    on the host (the one synchronisation of this path)."""
    T, k = ids.shape
    al = ops.moe_align(ids, p.num_experts, 1)  # block_m 1: rows = assignments, no padding
    counts, offsets = al.counts.tolist(), al.offsets.tolist()  # host sync
    tok = al.sorted_ids.long() // k
    rows = torch.zeros(al.sorted_ids.numel(), p.hidden_size, dtype=torch.float16, device=xk.device)
    for e, c in enumerate(counts):
        if c == 0:
            continue
        o = offsets[e]
        xe = xk[tok[o : o + c]]
        h = F.silu(xe @ ops.exl2_dequant(p.w1.expert(e))) * (xe @ ops.exl2_dequant(p.w3.expert(e)))
        rows[o : o + c] = h @ ops.exl2_dequant(p.w2.expert(e))
    return torch.ops.mixq.moe_finalize(rows, w, al.positions, res)


def moe_experts_ref(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    p: PreparedMoE,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch fp32 reference of `moe_experts` on the prepared (stacked) weights; host loop over experts."""
    xf = x.float()
    xk = xf[:, p.x_perm] if p.x_perm is not None else xf
    out = torch.zeros(x.shape[0], p.w2.out_features, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    for e in range(p.num_experts):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        xe = xk[tok]
        g = xe @ ops.exl2_dequant_ref(p.w1.expert(e)).float()
        u = xe @ ops.exl2_dequant_ref(p.w3.expert(e)).float()
        ye = (F.silu(g) * u) @ ops.exl2_dequant_ref(p.w2.expert(e)).float()
        out.index_add_(0, tok, ye * topk_weights[tok, slot, None].float())
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


def router(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router of a layer: `route(x @ gate_weight.T)`. On the kernel device with fp16/bf16 activations, one
    launch (`moe_router`: fp32 logits, softmax/top-k, int32 ids for the expert kernels); elsewhere the torch
    expression of transformers (logits in x's dtype)."""
    if ops.use_kernel(x) and x.dtype in (torch.float16, torch.bfloat16) and gate_weight.dtype == x.dtype:
        _, weights, ids = ops.moe_router(x, gate_weight, top_k)
        return weights, ids
    return route(F.linear(x, gate_weight), top_k)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, top-k (ties to the lower expert index), renormalise. Returns (weights fp32, ids)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def _route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return route(F.linear(x, router_weight.to(x.dtype)), top_k)


def moe_forward(x: torch.Tensor, router_weight: torch.Tensor, p: PreparedMoE, top_k: int, **kw) -> torch.Tensor:
    """A whole MoE layer: `router(x, router_weight)` (`[E, H]`; the fused router kernel on the kernel device),
    then `moe_experts` (keyword arguments go there)."""
    weights, ids = router(x, router_weight.to(x.dtype), top_k)
    return moe_experts(x, weights, ids, p, **kw)


def moe_forward_ref(
    x: torch.Tensor, router_weight: torch.Tensor, p: PreparedMoE, top_k: int, residual: torch.Tensor | None = None
) -> torch.Tensor:
    weights, ids = _route(x, router_weight, top_k)
    return moe_experts_ref(x, weights, ids, p, residual=residual)


# ---------------------------------------------------------------- model wiring


@functools.cache
def _log_once(msg: str) -> None:
    log.info(msg)


def prepare_for_model(experts: list, device: torch.device) -> PreparedMoE | None:
    """What `SparseMoE` on CUDA uses: a PreparedMoE when the fused path applies, else None (reference loop).
    The choice is logged once per distinct reason."""
    if not ops.cuda_ops_available():
        _log_once("MoE layers on CUDA use the reference expert loop (mixq._C or the GPU is not usable)")
        return None
    try:
        p = prepare_moe(experts, device)
    except MixqError as e:
        _log_once(f"MoE layers on CUDA use the reference expert loop: {e}")
        return None
    _log_once("MoE layers on CUDA use the fused mixq._C grouped expert kernels")
    return p


# ---------------------------------------------------------------- fake impls (shapes only; for opcheck/compile)

if ops.extension_loaded() and hasattr(torch.ops.mixq, "moe_gate_up"):

    @torch.library.register_fake("mixq::moe_gate_up")
    def _moe_gate_up_fake(x, topk_ids, sorted_ids, block_expert, block_m, w1_qweight, *rest):
        if block_expert is not None:
            rows = block_expert.shape[0] * block_m
        else:
            rows = min(w1_qweight.shape[0], topk_ids.shape[0] * topk_ids.shape[1]) * block_m
        return x.new_empty((rows, w1_qweight.shape[2]), dtype=torch.float16)

    @torch.library.register_fake("mixq::moe_down")
    def _moe_down_fake(
        inter, topk_weights, topk_ids, sorted_ids, block_expert, positions, block_m, w2_qweight, w2_qscale,
        w2_scale_max, w2_tile_group, w2_seg_bits, w2_seg_rows, residual=None, ctas=0, out_dtype=None,
    ):  # fmt: skip
        dtype = out_dtype or (residual.dtype if residual is not None else torch.float16)
        return inter.new_empty((topk_ids.shape[0], w2_qweight.shape[2]), dtype=dtype)

    @torch.library.register_fake("mixq::moe_finalize")
    def _moe_finalize_fake(rows, topk_weights, positions, residual=None):
        return rows.new_empty((topk_weights.shape[0], rows.shape[1]))
