"""Memory planning before a model is loaded: will weights + KV cache + scratch fit the GPU?

All sizes are bytes. The plan counts:

* weights: every tensor of the checkpoint as stored (safetensors headers), less the embedding table when it
  stays in host memory (exllamav2 keeps it on the CPU; only the looked-up rows go to the GPU);
* cache: K and V of every layer for `batch` sequences of `max_seq_len` tokens, rounded up to whole pages,
  at `bytes_per_value(cache_mode)` (scales included);
* scratch: activation buffers for one prefill chunk of `prefill_chunk` tokens (fp16 unless noted): the residual
  and normed hidden states, q/k/v and the attention output, RoPE tables, the boolean attention mask against
  the whole context, router logits (fp32), gate and up outputs for the top-k experts of every token, expert
  outputs, fp32 logits for the chunk, one dequantized expert matrix (the largest, for the dequantize + GEMM
  path), and with a quantized cache one layer's K and V of one sequence dequantized to fp16 for prefill;
* cuda_context: `CUDA_CONTEXT_BYTES`, the CUDA context, kernels and cuBLAS workspace of one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixq.errors import MixqError
from mixq.kernels.kv_quant import bytes_per_value, check_mode
from mixq.model.archs import arch_name
from mixq.model.checkpoint import TensorIndex
from mixq.model.config import MixtralConfig
from mixq.model.loader import resolve_device

GiB = 2**30
# CUDA context + loaded kernels + cuBLAS workspace of one torch process: about 0.5 GiB on recent GPUs.
CUDA_CONTEXT_BYTES = 512 * 2**20
ACT_BYTES = 2  # fp16 activations
SUGGEST_MODES = ("fp16", "q8", "q4")


@dataclass
class Plan:
    weights: int
    cache: int
    scratch: int
    cuda_context: int
    total: int
    device_bytes: int
    fits: bool
    max_seq_len: int
    batch: int
    cache_mode: str

    def summary(self) -> str:
        return (
            f"weights {self.weights / GiB:.2f} GiB + {self.cache_mode} cache {self.cache / GiB:.2f} GiB + scratch "
            f"{self.scratch / GiB:.2f} GiB + CUDA context {self.cuda_context / GiB:.2f} GiB = {self.total / GiB:.2f} "
            f"GiB of {self.device_bytes / GiB:.2f} GiB"
        )


def cache_tokens(max_seq_len: int, batch: int, page_size: int) -> int:
    """Tokens the page pool holds: every sequence's context rounded up to whole pages."""
    return batch * -(-max_seq_len // page_size) * page_size


def cache_bytes(cfg: MixtralConfig, tokens: int, cache_mode: str) -> int:
    per_token = 2 * cfg.num_hidden_layers * cfg.kv_size * bytes_per_value(cache_mode)
    return math.ceil(per_token * tokens)


def scratch_bytes(cfg: MixtralConfig, max_seq_len: int, batch: int, cache_mode: str, prefill_chunk: int) -> int:
    T = max(1, min(prefill_chunk, batch * max_seq_len))
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    k, E = cfg.num_experts_per_tok, cfg.num_local_experts
    act = ACT_BYTES * T * (2 * H + cfg.q_size + 2 * cfg.kv_size + cfg.q_size + 2 * hd)
    mask = T * max_seq_len
    moe = 4 * T * E + ACT_BYTES * T * k * (2 * I + H)
    logits = 4 * T * cfg.vocab_size
    dequant = ACT_BYTES * H * I
    kv_dequant = 0 if cache_mode == "fp16" else 2 * ACT_BYTES * max_seq_len * cfg.kv_size
    return act + mask + moe + logits + dequant + kv_dequant


def plan(
    cfg: MixtralConfig,
    weight_bytes: int,
    *,
    max_seq_len: int,
    batch: int = 1,
    cache_mode: str = "fp16",
    page_size: int = 16,
    device_bytes: int,
    embed_on_host: bool = True,
    prefill_chunk: int = 2048,
    embed_bytes: int | None = None,
) -> Plan:
    """Bytes needed for `batch` sequences of `max_seq_len`; `weight_bytes` is the whole checkpoint as stored
    and `embed_bytes` its embedding table (default vocab x hidden fp16)."""
    check_mode(cache_mode, cfg.head_dim)
    if embed_bytes is None:
        embed_bytes = cfg.vocab_size * cfg.hidden_size * 2
    weights = weight_bytes - (embed_bytes if embed_on_host else 0)
    cache = cache_bytes(cfg, cache_tokens(max_seq_len, batch, page_size), cache_mode)
    scratch = scratch_bytes(cfg, max_seq_len, batch, cache_mode, prefill_chunk)
    total = weights + cache + scratch + CUDA_CONTEXT_BYTES
    return Plan(
        weights,
        cache,
        scratch,
        CUDA_CONTEXT_BYTES,
        total,
        device_bytes,
        total <= device_bytes,
        max_seq_len,
        batch,
        cache_mode,
    )


def max_context(cfg: MixtralConfig, weight_bytes: int, *, page_size: int = 16, **kw) -> int:
    """Largest `max_seq_len` (a whole number of pages) that fits; 0 if not even one page does.

    Not capped at the model's `max_position_embeddings` (callers cap where they need to).
    """
    kw.pop("max_seq_len", None)

    def fits(pages: int) -> bool:
        return plan(cfg, weight_bytes, max_seq_len=pages * page_size, page_size=page_size, **kw).fits

    if not fits(1):
        return 0
    per_page = max(1, cache_bytes(cfg, page_size, kw.get("cache_mode", "fp16")))
    lo, hi = 1, kw["device_bytes"] // per_page + 2
    while lo < hi:  # fits() is monotonic in the context length
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * page_size


def model_label(cfg: MixtralConfig) -> str:
    arch = arch_name(cfg)
    name = {"mixtral-8x7b": "Mixtral-8x7B", "mixtral-8x22b": "Mixtral-8x22B"}.get(arch, "the model")
    q = cfg.raw.get("quantization_config") or {}
    if q.get("quant_method") == "exl2" and q.get("bits") is not None:
        return f"{name} EXL2 {float(q['bits']):.1f} bpw"
    return name


def _k(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 else str(n)


def _round_down(n: int) -> int:
    return n // 1000 * 1000 if n >= 1000 else n


def refusal(cfg: MixtralConfig, weight_bytes: int, *, max_seq_len: int, cache_mode: str, **kw) -> str:
    """One line: what the request needs, what fits per cache mode, and what to change."""
    p = plan(cfg, weight_bytes, max_seq_len=max_seq_len, cache_mode=cache_mode, **kw)
    fit = {m: max_context(cfg, weight_bytes, cache_mode=m, **kw) for m in SUGGEST_MODES}
    batch = f" x {p.batch} sequences" if p.batch > 1 else ""
    head = (
        f"{model_label(cfg)} needs {p.total / GiB:.1f} GiB at {max_seq_len} tokens{batch} with {cache_mode} cache "
        f"but the GPU has {p.device_bytes / GiB:.1f} GiB free"
    )
    if not any(fit.values()):
        base = plan(cfg, weight_bytes, max_seq_len=1, cache_mode="q4", **kw)
        return (
            f"{head}; the weights alone need {base.weights / GiB:.1f} GiB (plus {(base.total - base.weights) / GiB:.1f}"
            " GiB of scratch and CUDA context): use a lower-bpw checkpoint or a larger GPU"
        )
    fits = ", ".join(f"{_k(fit[m])} at {m}" if i else f"{_k(fit[m])} tokens at {m} cache" for i, m in enumerate(fit))
    fix = []
    order = SUGGEST_MODES[SUGGEST_MODES.index(cache_mode) + 1 :] if cache_mode in SUGGEST_MODES else ("q8", "q4")
    better = next((m for m in order if fit[m] >= max_seq_len), None)
    if better:
        fix.append(f"--cache {better}")
    own = max_context(cfg, weight_bytes, cache_mode=cache_mode, **kw)
    if own:
        fix.append(f"--max-seq-len {_round_down(own)}")
    elif not better:
        best = max(fit, key=fit.get)
        fix.append(f"--cache {best} --max-seq-len {_round_down(fit[best])}")
    return f"{head}; fits {fits} (use {' or '.join(fix)})"


def resolve_max_seq_len(
    cfg: MixtralConfig, weight_bytes: int, requested: int | str | None, *, cache_mode: str = "fp16", **kw
) -> int:
    """`requested` int, None (the model's context) or "auto" (the most that fits, up to the model's context).

    Raises MixqError with the one-line refusal when it does not fit.
    """
    limit = cfg.max_position_embeddings
    if requested == "auto":
        n = min(max_context(cfg, weight_bytes, cache_mode=cache_mode, **kw), limit)
        if n <= 0:
            raise MixqError(refusal(cfg, weight_bytes, max_seq_len=min(limit, 4096), cache_mode=cache_mode, **kw))
        return n
    n = limit if requested is None else int(requested)
    if not plan(cfg, weight_bytes, max_seq_len=n, cache_mode=cache_mode, **kw).fits:
        raise MixqError(refusal(cfg, weight_bytes, max_seq_len=n, cache_mode=cache_mode, **kw))
    return n


def checkpoint_bytes(path: str) -> tuple[int, int]:
    """(bytes of all tensors, bytes of the embedding table) from the safetensors headers (nothing is read)."""
    sizes = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1}
    index = TensorIndex(path)
    total = embed = 0
    for key in index.keys():
        n = math.prod(index.shape(key)) * sizes.get(index.dtype(key), 4)
        total += n
        if key == "model.embed_tokens.weight":
            embed = n
    return total, embed


def parse_seq_len(s: str) -> int | str:
    """argparse type of --max-seq-len: a positive integer or `auto`."""
    import argparse

    if s == "auto":
        return s
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number of tokens nor auto") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s}: must be at least 1")
    return n


def preflight(
    model_path: str, device, max_seq_len: int | str | None, cache_mode: str, batch: int = 1, page_size: int = 16
) -> int | None:
    """Before loading on CUDA: refuse (MixqError) a context that cannot fit and resolve `auto`.

    On the CPU there is nothing to check; `auto` becomes None (the model's context).
    """
    check_mode(cache_mode)

    dev = resolve_device(device)
    if dev.type != "cuda":
        return None if max_seq_len in (None, "auto") else int(max_seq_len)
    import torch

    cfg = MixtralConfig.from_dir(model_path)
    weight_bytes, embed = checkpoint_bytes(model_path)
    free, _ = torch.cuda.mem_get_info(dev)
    # mem_get_info created this process's context, already missing from `free`; the plan counts it itself.
    return resolve_max_seq_len(
        cfg,
        weight_bytes,
        max_seq_len,
        cache_mode=cache_mode,
        batch=batch,
        page_size=page_size,
        device_bytes=free + CUDA_CONTEXT_BYTES,
        embed_on_host=False,  # the loader keeps the embedding table on the device today
        embed_bytes=embed,
    )
