"""Paged KV cache: attention through block tables equals contiguous attention; pages are reused."""

import random

import pytest
import torch

from mixq.engine.kv_cache import PagedContext, PagePool, SeqState
from mixq.errors import MixqError
from mixq.kernels.attention import attention_mask, sdpa


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_equals_contiguous(page_size, window):
    heads, kv_heads, hd, layers = 4, 2, 8, 2
    n_seqs = 3
    lengths = [random.randint(1, 40) for _ in range(n_seqs)]
    pool = PagePool(
        layers, num_pages=128, page_size=page_size, kv_heads=kv_heads, head_dim=hd, dtype=torch.float32, device="cpu"
    )
    # Scramble the free list so block tables are not contiguous ranges.
    random.shuffle(pool._free)
    seqs = [SeqState(pages=pool.allocate(pool.pages_for(n))) for n in lengths]
    q = [torch.randn(n, heads, hd) for n in lengths]
    k = [torch.randn(n, kv_heads, hd) for n in lengths]
    v = [torch.randn(n, kv_heads, hd) for n in lengths]
    got = [[] for _ in lengths]
    done = [0] * n_seqs
    while any(d < n for d, n in zip(done, lengths)):  # feed each sequence in random-size chunks
        chunks, sl = [], []
        for i, (d, n) in enumerate(zip(done, lengths)):
            if d < n:
                c = random.randint(1, n - d)
                chunks.append((seqs[i], c))
                sl.append((i, d, d + c))
        ctx = PagedContext(pool, chunks, window)
        layer = random.randrange(layers)
        out = ctx.attend(
            layer,
            torch.cat([q[i][a:b] for i, a, b in sl]),
            torch.cat([k[i][a:b] for i, a, b in sl]),
            torch.cat([v[i][a:b] for i, a, b in sl]),
            0.3,
        )
        for layer_other in range(layers):  # every layer must hold the same k/v for the check below
            if layer_other != layer:
                ctx.attend(
                    layer_other,
                    torch.cat([q[i][a:b] for i, a, b in sl]),
                    torch.cat([k[i][a:b] for i, a, b in sl]),
                    torch.cat([v[i][a:b] for i, a, b in sl]),
                    0.3,
                )
        ctx.commit()
        pos = 0
        for i, a, b in sl:
            got[i].append(out[pos : pos + b - a])
            pos += b - a
            done[i] = b
    for i, n in enumerate(lengths):
        p = torch.arange(n)
        expected = sdpa(q[i], k[i], v[i], attention_mask(p, p, window), 0.3)
        torch.testing.assert_close(torch.cat(got[i]), expected, rtol=1e-5, atol=1e-5)


def test_allocator_frees_and_reuses_pages():
    pool = PagePool(1, num_pages=8, page_size=4, kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    a = pool.allocate(5)
    assert len(set(a)) == 5 and pool.free_pages == 3
    with pytest.raises(MixqError, match="KV cache is full"):
        pool.allocate(4)
    pool.release(a)
    assert a == [] and pool.free_pages == 8
    b = pool.allocate(8)
    assert sorted(b) == list(range(8))


def test_perplexity_through_each_cache_format(tmp_path):
    """fp16 cache scores like the plain forward; quantized caches cost a little, 4-bit more than 8-bit."""
    import mixq
    from mixq.engine.evaluate import perplexity, through_cache
    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    write_random_checkpoint(str(tmp_path), seed=random.randrange(10**6))
    model = mixq.load_model(str(tmp_path), dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (200,)).tolist()
    plain = perplexity(model, ids, 100)
    kl = {}
    for mode in ("fp16", "q8", "q4", "fp8"):
        r = perplexity(through_cache(model, mode, page_size=random.choice([4, 16])), ids, 100, reference=model)
        kl[mode] = r.kl
        assert r.tokens == plain.tokens
        assert abs(r.ppl - plain.ppl) / plain.ppl < (1e-5 if mode == "fp16" else 0.05), (mode, r.ppl, plain.ppl)
    assert kl["fp16"] < 1e-9 < kl["q8"] < kl["q4"], kl
