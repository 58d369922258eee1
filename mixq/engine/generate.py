"""Batched generation with continuous batching over the paged KV cache.

Each engine step packs, under a token budget, one decode token for every running sequence plus
prompt chunks of sequences still in prefill, runs one forward pass, and samples the sequences whose
prompt is complete. A finished sequence returns its pages to the pool and a waiting request takes
its place in the next step.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mixq.engine.cuda_graph import DecodeGraphs
from mixq.engine.kv_cache import PagedContext, PagePool, SeqState
from mixq.engine.sampling import Sampler, SamplingParams, token_logprobs
from mixq.errors import MixqError
from mixq.kernels import paged_attention
from mixq.model.mixtral import Mixtral
from mixq.model.tokenizer import StopMatcher

log = logging.getLogger("mixq")


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: list[str] = field(default_factory=list)
    eos_ids: list[int] | None = None  # None: the engine's defaults
    request_id: int | str | None = None
    logprobs: int | None = None  # report each sampled token's logprob and this many top alternatives (None: off)


@dataclass
class Output:
    """One sampled token of one request; `text` is the newly completed text (needs a tokenizer)."""

    request_id: int | str
    token: int | None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "eos", "stop", "length", "error" (then `error` says why)
    logprob: float | None = None  # with Request.logprobs: log-softmax of the raw logits at `token`
    top_logprobs: list[tuple[int, float]] | None = None  # with Request.logprobs: (token, logprob), best first
    error: str | None = None  # one line, when finish_reason is "error"


class _Sequence:
    def __init__(self, req: Request, state: SeqState, tokenizer, device):
        self.req, self.state = req, state
        self.tokens = list(req.prompt_ids)
        self.n_prompt = len(req.prompt_ids)
        self.sampler = Sampler(req.sampling, device)
        # The prompt is the decoder's prefix so the first generated word keeps its leading space.
        self.decoder = tokenizer.stream_decoder(req.prompt_ids) if tokenizer is not None else None
        self.stopper = None
        if req.stop_strings:
            self.stopper = StopMatcher(req.stop_strings)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def pending(self) -> int:
        """Tokens not yet in the cache (prompt remainder, or the last sampled token)."""
        return len(self.tokens) - self.state.length


class Engine:
    """Generation engine. `max_batch` sequences run at once; `cache_tokens` sizes the page pool."""

    def __init__(
        self,
        model: Mixtral,
        tokenizer=None,
        *,
        max_batch: int = 8,
        page_size: int = 16,
        cache_tokens: int | None = None,
        max_seq_len: int | None = None,
        step_tokens: int = 512,
        cache_mode: str = "fp16",
        cuda_graphs: bool = False,
    ):
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch, self.step_tokens = max_batch, max(step_tokens, max_batch)
        cache_tokens = cache_tokens or max_batch * min(self.max_seq_len, 4096)
        if cuda_graphs and model.device.type == "cuda":
            cuda_graphs = paged_attention.use_kernel(model.device, cfg.head_dim)
        else:
            cuda_graphs = False
        # CUDA graphs get one scratch page on top of the requested capacity (padding rows of a bucket write there).
        self.pool = PagePool.for_model(model, cache_tokens + (page_size if cuda_graphs else 0), page_size, cache_mode)
        self.graphs = None  # decode steps replayed from CUDA graphs (mixq.engine.cuda_graph)
        if cuda_graphs:
            scratch = self.pool.allocate(1)[0]
            self.graphs = DecodeGraphs(model, self.pool, max_batch, self.max_seq_len, scratch)
        self.eos_ids = list(tokenizer.eos_ids) if tokenizer is not None else list(cfg.eos_token_id)
        self.waiting: deque[Request] = deque()
        self.running: list[_Sequence] = []
        self._ids = itertools.count()

    def add(self, req: Request) -> int | str:
        self.check(req)
        if req.request_id is None:
            req.request_id = next(self._ids)
        self.waiting.append(req)
        return req.request_id

    def check(self, req: Request) -> None:
        """Raise MixqError if `add` would refuse `req` (reads only fixed sizes: safe from another thread)."""
        n = len(req.prompt_ids)
        if n == 0:
            raise MixqError("the prompt is empty; give at least one token of text")
        if n >= self.max_seq_len:
            raise MixqError(
                f"the prompt has {n} tokens but the context holds {self.max_seq_len}; "
                "shorten the prompt or raise --max-seq-len"
            )
        usable = self.pool.num_pages - (self.graphs is not None)  # the graphs' scratch page is not for requests
        if self.pool.pages_for(self._reserve(req)) > usable:
            raise MixqError(
                f"a request of {self._reserve(req)} tokens does not fit the KV cache "
                f"({usable * self.pool.page_size} tokens); raise --cache-tokens"
            )
        req.sampling.validate()

    def abort(self, request_id: int | str) -> bool:
        """Drop a waiting or running request and free its pages now; False if it is not (or no longer) here."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return True
        for seq in self.running:
            if seq.req.request_id == request_id:
                self.pool.release(seq.state.pages)
                self.running.remove(seq)
                return True
        return False

    def _reserve(self, req: Request) -> int:
        return min(len(req.prompt_ids) + req.max_new_tokens, self.max_seq_len)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            need = self.pool.pages_for(self._reserve(self.waiting[0]))
            if need > self.pool.free_pages:
                break  # wait for a running sequence to finish and free its pages
            req = self.waiting.popleft()
            state = SeqState(pages=self.pool.allocate(need))
            self.running.append(_Sequence(req, state, self.tokenizer, self.model.device))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[Output]:
        self._admit()
        if not self.running:
            return []
        budget = self.step_tokens
        chunks: list[tuple[_Sequence, int]] = []
        for seq in sorted(self.running, key=lambda s: s.pending() > 1):  # decoding sequences first
            n = min(seq.pending(), budget)
            if n > 0:
                chunks.append((seq, n))
                budget -= n
        ids, sample_rows, to_sample, row = [], [], [], 0
        for seq, n in chunks:
            ids.extend(seq.tokens[seq.state.length : seq.state.length + n])
            row += n
            if seq.state.length + n == len(seq.tokens):  # prompt complete: sample from the last row
                sample_rows.append(row - 1)
                to_sample.append(seq)
        device = self.model.device
        logits = None
        if self.graphs is not None and len(to_sample) == len(chunks) and all(n == 1 for _, n in chunks):
            # a pure decode step (one new token per sequence, every one sampled): replay a captured graph
            logits = self._graph_step([s.state for s, _ in chunks], ids)
        if logits is None:
            ctx = PagedContext(self.pool, [(s.state, n) for s, n in chunks], self.model.config.sliding_window)
            at = torch.tensor(sample_rows, dtype=torch.long, device=device)
            logits = self.model.forward_tokens(torch.tensor(ids, device=device), ctx, logits_at=at)
            ctx.commit()
        outputs = []
        finite = torch.isfinite(logits).all(-1).tolist()  # one sync per step; the sampler syncs per token anyway
        for seq, lg, ok in zip(to_sample, logits.float(), finite):
            if not ok:  # NaN/inf would crash sampling: end this request only
                outputs.append(self._fail(seq))
                continue
            token = seq.sampler(lg, torch.tensor(seq.tokens, device=device))
            out = self._append(seq, token)
            if seq.req.logprobs is not None:
                lp, top_lp, top_ids = token_logprobs(lg.view(1, -1), torch.tensor([token]), seq.req.logprobs)
                out.logprob = float(lp[0])
                out.top_logprobs = list(zip(top_ids[0].tolist(), top_lp[0].tolist()))
            outputs.append(out)
        return outputs

    def _graph_step(self, states: list[SeqState], ids: list[int]) -> torch.Tensor | None:
        try:
            logits = self.graphs.run(states, ids)
        except RuntimeError as e:  # not capturable (e.g. the reference expert loop syncs): stay eager
            log.info("CUDA graphs off, decode runs eagerly: %s", str(e).splitlines()[0][:200])
            self.graphs = None
            return None
        for state in states:
            state.length += 1
        return logits

    def _fail(self, seq: _Sequence) -> Output:
        self.pool.release(seq.state.pages)
        self.running.remove(seq)
        msg = (
            f"request {seq.req.request_id}: the model produced NaN or inf logits after {len(seq.tokens)} tokens "
            f"(activations overflow {str(self.model.dtype).replace('torch.', '')}?); try --dtype float32"
        )
        return Output(seq.req.request_id, None, finished=True, finish_reason="error", error=msg)

    def _append(self, seq: _Sequence, token: int) -> Output:
        seq.tokens.append(token)
        eos = seq.req.eos_ids if seq.req.eos_ids is not None else self.eos_ids
        out = Output(seq.req.request_id, token)
        if token in eos:
            out.finished, out.finish_reason = True, "eos"
        else:
            if seq.decoder is not None:
                out.text = seq.decoder.push(token)
            if seq.stopper is not None:
                out.text, stopped = seq.stopper.feed(out.text)
                if stopped:
                    out.finished, out.finish_reason = True, "stop"
        if not out.finished and (seq.generated >= seq.req.max_new_tokens or len(seq.tokens) >= self.max_seq_len):
            out.finished, out.finish_reason = True, "length"
        if out.finished:
            if seq.decoder is not None and out.finish_reason != "stop":
                tail = seq.decoder.flush()
                out.text += seq.stopper.feed(tail)[0] + seq.stopper.flush() if seq.stopper else tail
            self.pool.release(seq.state.pages)
            self.running.remove(seq)
        return out

    def stream(self) -> Iterator[Output]:
        while self.has_work():
            yield from self.step()

    def results(self) -> dict[int | str, list[int]]:
        """Run to completion; returns the generated token ids of each request."""
        res: dict[int | str, list[int]] = {}
        for out in self.stream():
            if out.token is not None:
                res.setdefault(out.request_id, []).append(out.token)
        return res


def generate_ids(
    model: Mixtral,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    sampling: SamplingParams | None = None,
    eos_ids: list[int] | None = None,
    **engine_kwargs,
) -> list[list[int]]:
    """Convenience: generate for several token-id prompts at once, in submission order (`eos_ids=[]`: never
    stop before `max_new_tokens`)."""
    engine = Engine(model, **engine_kwargs)
    sampling = sampling or SamplingParams()
    rids = [engine.add(Request(list(p), max_new_tokens, sampling, eos_ids=eos_ids)) for p in prompts]
    res = engine.results()
    return [res.get(r, []) for r in rids]
