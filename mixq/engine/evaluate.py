"""Perplexity and KL divergence on held-out text (used by `mixq ppl`, the demo and bench/quality)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixq.engine.kv_cache import PagedContext, PagePool, SeqState
from mixq.engine.sampling import token_logprobs
from mixq.errors import MixqError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood, nats per token
    tokens: int  # tokens scored
    kl: float | None = None  # mean KL(reference || model) per token, nats, when a reference is given


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens (the last, shorter one is kept if it has ≥ 2 tokens)."""
    if length < 2:
        raise MixqError(f"--length {length}: a perplexity window needs at least 2 tokens")
    out = [ids[i : i + length] for i in range(0, len(ids), length)]
    out = [w for w in out if len(w) >= 2]
    if not out:
        raise MixqError("the text is too short to measure perplexity (fewer than 2 tokens)")
    return out


@torch.inference_mode()
def perplexity(
    model: Callable[[torch.Tensor], torch.Tensor],
    ids: list[int],
    length: int = 512,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device=None,
    max_windows: int | None = None,
) -> PerplexityResult:
    """Mean NLL of each window's tokens 1..L-1 given the preceding ones; KL to `reference` if given."""
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    for w in windows(ids, length)[:max_windows]:
        x = torch.tensor([w], device=device)
        logp = F.log_softmax(model(x)[0, :-1].float(), dim=-1)
        target = x[0, 1:].to(logp.device)
        nll_sum += -logp.gather(1, target[:, None]).sum().item()
        if reference is not None:
            ref_logp = F.log_softmax(reference(x)[0, :-1].float(), dim=-1).to(logp.device)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        count += len(w) - 1
    nll = nll_sum / count
    return PerplexityResult(math.exp(nll), nll, count, kl_sum / count if reference is not None else None)


def through_cache(model, cache_mode: str, page_size: int = 16) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` as a `[1, T] -> [1, T, vocab]` callable whose attention writes every key and value into a paged
    KV cache in `cache_mode` (fp16, q8, q4, fp8) and reads them back from it, as generation does: perplexity
    through it is the accuracy cost of the cache format."""
    cfg = model.config

    def run(x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        pool = PagePool.for_model(model, T, page_size, cache_mode)
        ctx = PagedContext(pool, [(SeqState(pages=pool.allocate(pool.num_pages)), T)], cfg.sliding_window)
        with torch.inference_mode():
            return model.forward_tokens(x[0].to(model.device), ctx)[None]

    return run


def prompt_logprobs(model, ids: list[int], top_n: int = 0) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Each prompt token's logprob given the tokens before it (OpenAI's `echo` with `logprobs`, which evaluation
    harnesses use to score a continuation): one full forward of the prompt. The first token has no context, so its
    logprob is None and its top list empty, as in OpenAI's and vLLM's answers."""
    if len(ids) < 2:
        return [None] * len(ids), [[] for _ in ids]
    logits = model(torch.tensor([ids], device=model.device))[0, :-1]
    lp, top_lp, top_ids = token_logprobs(logits, torch.tensor(ids[1:]), top_n)
    tops = [list(zip(i.tolist(), v.tolist())) for i, v in zip(top_ids, top_lp)]
    return [None, *lp.tolist()], [[], *tops]
