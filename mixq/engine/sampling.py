"""Token sampling: repetition penalty, OpenAI's presence/frequency penalties, temperature, top-k, top-p, min-p
(transformers / llama.cpp order), and the log-probabilities the OpenAI API reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixq.errors import MixqError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh random seed per Sampler
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated; 0 = off
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated text; 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(flag: str, rule: str, value) -> MixqError:
            return MixqError(f"--{flag} must be {rule}, got {value}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", ">= 0 (0 = greedy)", self.temperature)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top-k", "an integer >= 0 (0 = off)", self.top_k)
        if not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise bad("top-p", "in (0, 1]", self.top_p)
        if not (0.0 <= self.min_p <= 1.0):
            raise bad("min-p", "in [0, 1]", self.min_p)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition-penalty", "> 0 (1 = off)", self.repetition_penalty)
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad("seed", "an integer in [0, 2^63)", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise bad(name.replace("_", "-"), "in [-2, 2] (0 = off)", value)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: over the set of ids in `history`, divide positive logits and multiply negative ones."""
    if penalty == 1.0 or history is None or history.numel() == 0:
        return logits
    ids = history.to(device=logits.device, dtype=torch.long).flatten()
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]  # prompt ids past the model's vocabulary are ignored
    vals = logits.gather(0, ids)
    logits = logits.clone()
    logits.scatter_(0, ids, torch.where(vals > 0, vals / penalty, vals * penalty))  # duplicates write equal values
    return logits


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor | None, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: `logits[j] - counts[j] * frequency - (counts[j] > 0) * presence`, where `counts` [V]
    holds how often each token was generated so far (the prompt does not count)."""
    if counts is None or (presence == 0.0 and frequency == 0.0):
        return logits
    counts = counts.to(logits.device, logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0):
    """Log-probabilities under the model's own distribution (log-softmax of the raw logits, before any sampling
    filter, as vLLM and OpenAI report them). `logits` [T, V], `tokens` [T]: returns (the tokens' logprobs [T],
    top-`top_n` logprobs [T, n] and their ids [T, n]), all float32 on the logits' device."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens.to(lp.device, torch.long).view(-1, 1)).view(-1)
    top_lp, top_ids = torch.topk(lp, min(top_n, lp.shape[-1]), dim=-1)
    return chosen, top_lp, top_ids


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after temperature, top-k, top-p and min-p, renormalized; returns (probs, ids) where
    `ids` maps positions of `probs` to vocabulary ids (None: probs covers the whole vocabulary)."""
    logits = logits.float() / p.temperature
    ids = None
    if p.top_k > 0 or p.top_p < 1.0:
        if 0 < p.top_k < logits.numel():
            logits, ids = torch.topk(logits, p.top_k)  # sorted, descending
        else:
            logits, ids = torch.sort(logits, descending=True)
    probs = torch.softmax(logits, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_p < 1.0:  # smallest prefix whose mass reaches top_p: keep j while the mass before it is < top_p
        before = probs.cumsum(-1) - probs
        keep &= before < p.top_p
        keep[0] = True
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs.max()
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(), ids


class Sampler:
    """Samples one sequence's tokens; holds its own generator, so a seed fixes the whole sequence."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        params.validate()
        self.params = params
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        # How often this sampler drew each token (OpenAI's penalties count the generated text only).
        self.counts: torch.Tensor | None = None

    @property
    def plain_greedy(self) -> bool:
        p = self.params
        return p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        p = self.params
        logits = apply_repetition_penalty(logits.float(), history, p.repetition_penalty)
        logits = apply_presence_frequency_penalty(logits, self.counts, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            token = int(torch.argmax(logits).item())
        else:
            probs, ids = filtered_probs(logits, p)
            choice = torch.multinomial(probs, 1, generator=self.generator)
            token = int((ids[choice] if ids is not None else choice).item())
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            if self.counts is None:
                self.counts = torch.zeros(logits.shape[-1], dtype=torch.int32, device=logits.device)
            self.counts[token] += 1
        return token


def sample_batch(
    logits: torch.Tensor, samplers: Sequence[Sampler], histories: Sequence[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """One token per row of `logits` [B, V]; a single argmax when every row is greedy without penalty."""
    if all(s.plain_greedy for s in samplers):
        return torch.argmax(logits, dim=-1)
    histories = histories if histories is not None else [None] * len(samplers)
    toks = [s(row, h) for s, row, h in zip(samplers, logits, histories, strict=True)]
    return torch.tensor(toks, dtype=torch.long, device=logits.device)
