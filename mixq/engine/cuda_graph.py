"""The decode step captured in CUDA graphs, one per batch bucket, replayed with new inputs.

A decode step is one token per running sequence. Everything that changes between steps (token ids,
positions, cache write slots, block tables, sequence lengths) lives in static device tensors that are
refilled before each replay; the captured work is the whole forward pass (EXL2 GEMMs, the grouped expert
kernels, paged cache write and decode attention, lm_head). Batches are padded up to the next bucket with
rows that read and write a scratch page of the pool only.

Capture needs a forward without host synchronisation: CUDA kernels for attention (mixq._C) and the fused
MoE path (EXL2 experts). When capture fails (an fp16 model's reference expert loop, no extension), the
engine logs why once and stays eager.
"""

from __future__ import annotations

import logging

import torch

from mixq.engine.kv_cache import PagePool, SeqState, attend_paged_kernel
from mixq.kernels.layers import Rope

log = logging.getLogger("mixq")


def buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: powers of two up to `max_batch`, and `max_batch` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class StaticDecodeContext:
    """AttentionContext of a captured decode step: one query per row, through static block tables."""

    def __init__(self, pool: PagePool, batch: int, max_pages: int, window: int | None):
        dev = pool.k.device
        self.pool, self.window = pool, window
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.write_slots = torch.zeros(batch, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(batch, max_pages, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(batch, dtype=torch.int32, device=dev)

    def attend(self, layer: int, q, k, v, scale: float, rope: Rope | None = None) -> torch.Tensor:
        return attend_paged_kernel(
            self.pool, layer, q, k, v, scale, self.write_slots, self.block_tables, self.seq_lens, self.window, rope
        )


class DecodeGraphs:
    """Captured decode steps of `model` over `pool` for every bucket up to `max_batch` (captured lazily)."""

    def __init__(self, model, pool: PagePool, max_batch: int, max_seq_len: int, scratch_page: int):
        self.model, self.pool, self.scratch_page = model, pool, scratch_page
        self.max_pages = -(-max_seq_len // pool.page_size)
        self.buckets = buckets(max_batch)
        self.mempool = torch.cuda.graph_pool_handle()  # buckets share one memory pool for their activations
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, StaticDecodeContext, torch.Tensor, torch.Tensor]] = {}

    def _fill(self, ctx: StaticDecodeContext, ids: torch.Tensor, states: list[SeqState], tokens: list[int]) -> None:
        ps, n, B = self.pool.page_size, len(states), ids.shape[0]
        pad = B - n
        pos = [s.length for s in states] + [0] * pad
        slots = [s.pages[s.length // ps] * ps + s.length % ps for s in states] + [self.scratch_page * ps] * pad
        tables = [s.pages + [self.scratch_page] * (self.max_pages - len(s.pages)) for s in states]
        tables += [[self.scratch_page] * self.max_pages] * pad
        host = {
            "ids": torch.tensor(tokens + [0] * pad, dtype=torch.long),
            "positions": torch.tensor(pos, dtype=torch.long),
            "write_slots": torch.tensor(slots, dtype=torch.long),
            "block_tables": torch.tensor(tables, dtype=torch.int32),
            "seq_lens": torch.tensor([p + 1 for p in pos], dtype=torch.int32),
        }
        ids.copy_(host.pop("ids"), non_blocking=True)
        for name, t in host.items():
            getattr(ctx, name).copy_(t, non_blocking=True)

    def run(self, states: list[SeqState], tokens: list[int]) -> torch.Tensor:
        """Logits `[len(states), vocab]` of one decode step (token `tokens[i]` at position `states[i].length`).
        Raises RuntimeError when the step cannot be captured; the caller then runs it eagerly."""
        n = len(states)
        B = next(b for b in self.buckets if b >= n)
        if B not in self.graphs:
            self.graphs[B] = self._capture(B, states, tokens)
        graph, ctx, ids, logits = self.graphs[B]
        self._fill(ctx, ids, states, tokens)
        graph.replay()
        return logits[:n]

    @torch.inference_mode()
    def _capture(self, B: int, states: list[SeqState], tokens: list[int]):
        dev = self.pool.k.device
        ctx = StaticDecodeContext(self.pool, B, self.max_pages, self.model.config.sliding_window)
        ids = torch.zeros(B, dtype=torch.long, device=dev)
        self._fill(ctx, ids, states, tokens)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: lazy preparation, allocator and cuBLAS state outside the graph
            for _ in range(2):
                self.model.forward_tokens(ids, ctx)  # same slots and values as the replay: idempotent writes
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = self.model.forward_tokens(ids, ctx)
        log.info("captured the decode step for batch %d in a CUDA graph", B)
        return graph, ctx, ids, logits
