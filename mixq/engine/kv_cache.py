"""Paged KV cache: a pool of fixed-size pages shared by all sequences, with per-sequence block tables.

Layout per layer: `k[layer]` is `[num_pages * page_size, kv_heads, row]`, so a token's slot is
`page * page_size + offset` (vLLM's slot mapping). Writing a step's keys is one indexed copy; reading a
sequence gathers its slots through the block table. Kernels read the same layout on the GPU.

The cache `mode` (mixq/kernels/kv_quant.py) sets what a row holds: "fp16" the activation dtype (row = head_dim),
"fp8" e4m3 bytes with one per-tensor scale (`fp8_scale`), "q8"/"q4" uint8 codes (row = head_dim or
head_dim / 2) with fp16 scales per 32 values in `k_scales[layer]` `[slots, kv_heads, head_dim / 32]`.
Writes quantize, reads dequantize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixq.errors import MixqError
from mixq.kernels import layers, paged_attention
from mixq.kernels.attention import attention_mask, sdpa
from mixq.kernels.kv_quant import GROUP, check_mode, code_dtype, code_width, dequantize_kv, quantize_kv
from mixq.kernels.layers import Rope


class PagePool:
    """Fixed pool of KV pages with a free list. Pages freed by finished sequences are reused."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        mode: str = "fp16",
        fp8_scale: float = 1.0,
    ):
        if page_size < 1 or num_pages < 1:
            raise MixqError(f"KV cache needs at least one page of at least one token (got {num_pages}x{page_size})")
        check_mode(mode, head_dim)
        self.num_pages, self.page_size, self.head_dim = num_pages, page_size, head_dim
        self.mode, self.dtype, self.fp8_scale = mode, dtype, fp8_scale
        shape = (num_layers, num_pages * page_size, kv_heads, code_width(mode, head_dim))
        self.k = torch.zeros(shape, dtype=code_dtype(mode, dtype), device=device)
        self.v = torch.zeros(shape, dtype=code_dtype(mode, dtype), device=device)
        self.k_scales = self.v_scales = None
        if mode in ("q8", "q4"):
            sshape = (num_layers, num_pages * page_size, kv_heads, head_dim // GROUP)
            self.k_scales = torch.zeros(sshape, dtype=torch.float16, device=device)
            self.v_scales = torch.zeros(sshape, dtype=torch.float16, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page numbers first

    @classmethod
    def for_model(cls, model, tokens: int, page_size: int, mode: str = "fp16") -> PagePool:
        """A pool holding at least `tokens` tokens of every layer of `model`, on its device and in its dtype."""
        cfg = model.config
        pages = -(-tokens // page_size)
        kv = (cfg.num_key_value_heads, cfg.head_dim)
        return cls(cfg.num_hidden_layers, pages, page_size, *kv, model.dtype, model.device, mode)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MixqError(f"KV cache is full: {n} pages requested, {len(self._free)} free; raise --cache-tokens")
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()

    def nbytes(self) -> int:
        """Device bytes of the cache storage (codes and scales)."""
        ts = [self.k, self.v, self.k_scales, self.v_scales]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `k`/`v` `[N, kv_heads, head_dim]` at `slots`, quantizing on write."""
        for new, cache, scales in ((k, self.k, self.k_scales), (v, self.v, self.v_scales)):
            codes, sc = quantize_kv(new, self.mode, self.fp8_scale)
            cache[layer][slots] = codes.to(cache.dtype)
            if scales is not None:
                scales[layer][slots] = sc

    def read(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[len(slots), kv_heads, head_dim]` at `slots`, dequantized to `dtype`."""
        out = []
        for cache, scales in ((self.k, self.k_scales), (self.v, self.v_scales)):
            sc = scales[layer][slots] if scales is not None else torch.tensor(self.fp8_scale, device=cache.device)
            out.append(dequantize_kv(cache[layer][slots], sc, self.mode, dtype))
        return out[0], out[1]


@dataclass
class SeqState:
    """A sequence's view of the cache: its pages and how many tokens are stored."""

    pages: list[int] = field(default_factory=list)
    length: int = 0

    def slots(self, page_size: int, start: int, end: int, device) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(self.pages, dtype=torch.long)
        return (table[pos // page_size] * page_size + pos % page_size).to(device)


class PagedContext:
    """Attention over a flat batch of new tokens from several sequences, through their block tables.

    `chunks` lists, per sequence, (state, number of new tokens); the new tokens are laid out
    consecutively in that order. Each sequence must already own pages for `length + n` tokens.
    """

    def __init__(self, pool: PagePool, chunks: list[tuple[SeqState, int]], window: int | None = None):
        self.pool, self.window = pool, window
        device = pool.k.device
        ps = pool.page_size
        self.spans: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        write, positions, start = [], [], 0
        for state, n in chunks:
            past = state.length
            if pool.pages_for(past + n) > len(state.pages):
                raise RuntimeError("sequence has too few pages for its new tokens")  # engine bug, not user input
            new_slots = state.slots(ps, past, past + n, device)
            all_slots = state.slots(ps, 0, past + n, device)
            q_pos = torch.arange(past, past + n, device=device)
            mask = attention_mask(q_pos, torch.arange(past + n, device=device), window)
            self.spans.append((start, start + n, all_slots, mask, q_pos))
            write.append(new_slots)
            positions.append(q_pos)
            start += n
        self.write_slots = torch.cat(write)
        self.positions = torch.cat(positions)
        self._chunks = chunks
        self.use_kernel = False
        if all(n == 1 for _, n in chunks):
            # decode step: one query per sequence, through the block table
            if paged_attention.use_kernel(pool.k, pool.head_dim):
                width = max(len(s.pages) for s, _ in chunks)
                tables = [s.pages + [0] * (width - len(s.pages)) for s, _ in chunks]
                self.use_kernel = True
                self.block_tables = torch.tensor(tables, dtype=torch.int32, device=device)
                self.seq_lens = torch.tensor([s.length + 1 for s, _ in chunks], dtype=torch.int32, device=device)

    def attend(self, layer: int, q, k, v, scale: float, rope: Rope | None = None) -> torch.Tensor:
        if self.use_kernel:
            return self._attend_kernel(layer, q, k, v, scale, rope)
        q, k = layers.rope_qk(q, k, rope)
        self.pool.write(layer, self.write_slots, k, v)
        out = torch.empty_like(q)
        for s, e, slots, mask, _ in self.spans:
            k_seq, v_seq = self.pool.read(layer, slots, q.dtype)
            out[s:e] = sdpa(q[s:e], k_seq, v_seq, mask, scale)
        return out

    def _attend_kernel(self, layer: int, q, k, v, scale: float, rope: Rope | None) -> torch.Tensor:
        return attend_paged_kernel(
            self.pool, layer, q, k, v, scale, self.write_slots, self.block_tables, self.seq_lens, self.window, rope
        )

    def commit(self) -> None:
        """Record that the new tokens are now stored (call after the forward pass)."""
        for state, n in self._chunks:
            state.length += n


def attend_paged_kernel(
    pool: PagePool,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    write_slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None,
    rope: Rope | None = None,
) -> torch.Tensor:
    """One query per sequence (decode) on CUDA: store this step's k/v at `write_slots` (applying `rope` to k and q in
    the same launch), then attend through the block tables with the mixq._C kernels; no host synchronisation
    (CUDA-graph capturable)."""
    ks = pool.k_scales[layer] if pool.k_scales is not None else None
    vs = pool.v_scales[layer] if pool.v_scales is not None else None
    paged_attention.paged_cache_write(
        k, v, pool.k[layer], pool.v[layer], write_slots, ks, vs, pool.fp8_scale, pool.fp8_scale, q=q, rope=rope
    )
    return paged_attention.paged_decode_attention(
        q,
        pool.k[layer],
        pool.v[layer],
        block_tables,
        seq_lens,
        pool.page_size,
        scale,
        window,
        ks,
        vs,
        pool.fp8_scale,
        pool.fp8_scale,
    )
