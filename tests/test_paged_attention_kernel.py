"""Paged decode attention and cache writes (mixq.kernels.paged_attention, csrc/attention).

CPU: the reference equals mixq.engine.kv_cache.PagedContext attention, and the storage formats round-trip.
Kernels (a GPU with mixq._C, or the CPU kernel emulation; skipped otherwise): kernels vs the reference over random
lengths, page sizes, GQA ratios, head dims, batch sizes and cache modes; opcheck; CUDA-graph capture and replay
(GPU only).

Tolerance of the attention kernel against the fp32 reference on the same cache contents: the kernel keeps
everything in fp32 and rounds once to the output dtype, the reference rounds its fp32 result once too, so
both sit within one rounding of the exact value: |out - ref| <= 2 ulp(dtype) * max|ref| (fp16 2^-9, bf16
2^-6) plus 1e-5 of fp32 summation-order noise over up to 33k tokens.
"""

import math
import random

import pytest
import torch
from kernel_env import DEV, poison_allocator, size

from mixq.engine.kv_cache import PagedContext, PagePool, SeqState
from mixq.errors import MixqError
from mixq.kernels.kv_quant import GROUP, MODES, SCALE_UNIT, code_dtype, code_width, quantize_kv
from mixq.kernels.paged_attention import (
    paged_cache_write,
    paged_cache_write_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
)

TOL = {torch.float16: 2**-9, torch.bfloat16: 2**-6}


def _hadamard_by_formula(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j), built independently of mixq.kernels.kv_quant's butterfly."""
    i = torch.arange(n)
    return torch.tensor([[(-1.0) ** bin(a & b).count("1") for b in i.tolist()] for a in i.tolist()])


# ------------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q_tokens", [1, 3])
@pytest.mark.parametrize("window", [None, 7])
def test_ref_equals_paged_context(mode, q_tokens, window):
    heads, kv_heads, hd, page_size = 8, random.choice([1, 2, 8]), 32, random.choice([1, 4, 16])
    lengths = [random.randint(0, 60) for _ in range(3)]
    fp8_scale = 0.5 if mode == "fp8" else 1.0
    pool = PagePool(1, num_pages=256, page_size=page_size, kv_heads=kv_heads, head_dim=hd, dtype=torch.float32,
                    device="cpu", mode=mode, fp8_scale=fp8_scale)  # fmt: skip
    random.shuffle(pool._free)  # block tables that are not contiguous ranges
    seqs = [SeqState(pages=pool.allocate(pool.pages_for(n + q_tokens))) for n in lengths]
    prefill = [(s, n) for s, n in zip(seqs, lengths) if n > 0]
    total = sum(lengths)
    PagedContext(pool, prefill, window).attend(
        0, torch.randn(total, heads, hd), torch.randn(total, kv_heads, hd), torch.randn(total, kv_heads, hd), 0.25
    )
    for s, n in zip(seqs, lengths):
        s.length = n
    B = len(seqs)
    q = torch.randn(B * q_tokens, heads, hd)
    ctx = PagedContext(pool, [(s, q_tokens) for s in seqs], window)
    want = ctx.attend(0, q, torch.randn(B * q_tokens, kv_heads, hd), torch.randn(B * q_tokens, kv_heads, hd), 0.25)

    max_pages = max(len(s.pages) for s in seqs) + 2
    tables = torch.tensor([s.pages + [random.randrange(256) for _ in range(max_pages - len(s.pages))] for s in seqs])
    seq_lens = torch.tensor([n + q_tokens for n in lengths], dtype=torch.int32)
    qb = q.view(B, q_tokens, heads, hd) if q_tokens > 1 else q.view(B, heads, hd)
    ks = None if pool.k_scales is None else pool.k_scales[0]
    vs = None if pool.v_scales is None else pool.v_scales[0]
    args = (qb, pool.k[0], pool.v[0], tables.int(), seq_lens, page_size, 0.25, window, ks, vs, fp8_scale, fp8_scale)
    got = paged_decode_attention_ref(*args)
    torch.testing.assert_close(got.reshape(B * q_tokens, heads, hd), want, rtol=1e-5, atol=1e-5)
    # The dispatcher falls back to the reference on CPU.
    torch.testing.assert_close(paged_decode_attention(*args), got, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_cache_write_ref(mode):
    N, H, D, slots = 6, 2, 64, 40
    k, v = torch.randn(N, H, D, dtype=torch.bfloat16), torch.randn(N, H, D, dtype=torch.bfloat16)
    dt = code_dtype(mode, torch.bfloat16)
    kc = torch.zeros(slots, H, code_width(mode, D), dtype=dt)
    vc = torch.zeros_like(kc)
    quant = mode in ("q8", "q4")
    ks = torch.zeros(slots, H, D // GROUP, dtype=torch.float16) if quant else None
    vs = torch.zeros_like(ks) if quant else None
    slot_mapping = torch.tensor(random.sample(range(slots), N))
    slot_mapping[2] = -1
    paged_cache_write(k, v, kc, vc, slot_mapping, ks, vs, 0.5, 2.0)
    kept = slot_mapping >= 0
    for x, c, s, fp8_scale in ((k, kc, ks, 0.5), (v, vc, vs, 2.0)):
        want, want_s = quantize_kv(x[kept], mode, fp8_scale)
        assert torch.equal(c[slot_mapping[kept]].view(torch.uint8), want.view(torch.uint8))
        if s is not None:
            assert torch.equal(s[slot_mapping[kept]], want_s)
        untouched = torch.ones(slots, dtype=torch.bool)
        untouched[slot_mapping[kept]] = False
        assert (c[untouched].view(torch.uint8) == 0).all()


def test_bad_cache_dtype_raises():
    q = torch.randn(1, 4, 64, dtype=torch.float16)
    bad = torch.zeros(16, 1, 64, dtype=torch.float32)
    with pytest.raises(MixqError, match="KV cache tensor"):
        paged_decode_attention(q, bad, bad, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]), 16, 0.1)


def _emulate_kernel(q, codes_k, scales_k, codes_v, scales_v, mode, seq_len, window, partition, tile=32):
    """The CUDA kernel's arithmetic for one sequence and one KV head, step by step in fp64 (its design, not
    its code): q pre-scaled by scale * log2(e) and, for q8/q4, rotated by H/32 so keys stay in the rotated
    domain; tiles of `tile` tokens with an online exp2 softmax per partition; P.V in the rotated domain,
    rotated back by H/32 at the end; partitions combined with weights l * 2^(m - M)."""
    rows, D = q.shape  # rows = Tq * group, here Tq = 1
    h = _hadamard_by_formula(GROUP).double()
    quant = mode in ("q8", "q4")
    zero = {"q8": 128, "q4": 8}.get(mode, 0)

    def rotated(codes, scales):  # [L, D] as the kernel sees them: (code - zero) * unit * scale, no inverse H
        c = torch.stack([codes & 0xF, codes >> 4], -1).flatten(-2) if mode == "q4" else codes
        step = scales.double()[..., None] * SCALE_UNIT[mode]
        return ((c.double() - zero).view(-1, D // GROUP, GROUP) * step).view(-1, D)

    kr, vr = rotated(codes_k, scales_k), rotated(codes_v, scales_v)
    qs = q.double() * (D**-0.5) * math.log2(math.e)
    if quant:
        qs = (qs.view(rows, -1, GROUP) @ h / GROUP).view(rows, D)
    lo_all = max(0, seq_len - 1 - window + 1) if window else 0
    parts = []
    for p0 in range(0, seq_len, partition):
        lo, hi = max(lo_all, p0), min(seq_len, p0 + partition)
        m, l, acc = torch.full((rows,), -math.inf, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64), 0
        for t0 in range(lo, hi, tile):
            s = qs @ kr[t0 : min(t0 + tile, hi)].T
            m_new = torch.maximum(m, s.amax(1))
            alpha = torch.where(m_new == -math.inf, 1.0, torch.exp2(m - m_new))
            p = torch.exp2(s - m_new[:, None])
            l = l * alpha + p.sum(1)
            acc = acc * alpha[:, None] + p @ vr[t0 : min(t0 + tile, hi)]
            m = m_new
        if hi > lo:
            o = acc / l[:, None]
            parts.append((m, l, (o.view(rows, -1, GROUP) @ h / GROUP).view(rows, D) if quant else o))
    big_m = torch.stack([m for m, _, _ in parts]).amax(0)
    w = [l * torch.exp2(m - big_m) for m, l, _ in parts]
    return sum(wi[:, None] * o for wi, (_, _, o) in zip(w, parts)) / sum(w)[:, None]


@pytest.mark.parametrize("mode", ["q8", "q4"])
@pytest.mark.parametrize("window", [None, 100])
def test_kernel_design_emulation(mode, window):
    """The rotated-domain trick, the exp2 online softmax and the partition merge give the reference result."""
    D, group, L = 64, 4, random.randint(300, 700)
    codes_k, sk = quantize_kv(torch.randn(L, 1, D), mode)
    codes_v, sv = quantize_kv(torch.randn(L, 1, D), mode)
    q = torch.randn(1, group, D)
    got = _emulate_kernel(q[0], codes_k[:, 0], sk[:, 0], codes_v[:, 0], sv[:, 0], mode, L, window, 128)
    table = torch.arange(L).view(1, L).int()
    want = paged_decode_attention_ref(
        q, codes_k, codes_v, table, torch.tensor([L], dtype=torch.int32), 1, D**-0.5, window, sk, sv
    )
    torch.testing.assert_close(got.float(), want[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ kernels


def _need_ops():
    from mixq.kernels.paged_attention import available

    if not available():
        pytest.skip("mixq._C was built without the attention ops")


def _make_case(lengths, page_size, hq, hkv, D, act, mode, q_tokens=1, spare_pages=8, fp8_scale=1.0):
    """A NaN-poisoned pool with each sequence's tokens written (by the reference writer) into shuffled pages."""
    dev = DEV
    need = [-(-n // page_size) for n in lengths]
    num_pages = sum(need) + spare_pages
    row, srow = code_width(mode, D), (D // GROUP if mode in ("q8", "q4") else 0)
    dt = code_dtype(mode, act)
    slots = num_pages * page_size
    kc = torch.empty(slots, hkv, row, dtype=dt, device=dev)
    vc = torch.empty_like(kc)
    if mode == "fp16":
        kc.fill_(float("nan")), vc.fill_(float("nan"))
    else:
        fill = 0x7F if mode == "fp8" else 0x33  # e4m3fn NaN / arbitrary codes under NaN scales
        kc.view(torch.uint8).fill_(fill), vc.view(torch.uint8).fill_(fill)
    ks = torch.full((slots, hkv, srow), float("nan"), dtype=torch.float16, device=dev) if srow else None
    vs = torch.full_like(ks, float("nan")) if srow else None
    perm = torch.randperm(num_pages).tolist()
    max_pages = max(need) + 2
    tables, cursor = [], 0
    for n in need:
        pages = perm[cursor : cursor + n]
        cursor += n
        tables.append(pages + random.choices(perm[sum(need) :], k=max_pages - n))  # junk entries: poisoned pages
    tables = torch.tensor(tables, dtype=torch.int32, device=dev)
    for b, n in enumerate(lengths):
        pos = torch.arange(n, device=dev)
        slot = tables[b].long()[pos // page_size] * page_size + pos % page_size
        k = torch.randn(n, hkv, D, device=dev, dtype=act)
        v = torch.randn(n, hkv, D, device=dev, dtype=act)
        paged_cache_write_ref(k, v, kc, vc, slot, ks, vs, fp8_scale, fp8_scale)
    shape = (len(lengths), hq, D) if q_tokens == 1 else (len(lengths), q_tokens, hq, D)
    q = torch.randn(shape, device=dev, dtype=act)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    return q, kc, vc, tables, seq_lens, ks, vs


def _check(q, kc, vc, tables, seq_lens, page_size, window=None, ks=None, vs=None, fp8_scale=1.0):
    scale = q.shape[-1] ** -0.5
    poison_allocator()
    got = torch.ops.mixq.paged_decode_attention(
        q, kc, vc, tables, seq_lens, page_size, scale, window or 0, ks, vs, fp8_scale, fp8_scale
    )
    want = paged_decode_attention_ref(
        q, kc, vc, tables, seq_lens, page_size, scale, window, ks, vs, fp8_scale, fp8_scale, torch.float32
    )
    assert not got.isnan().any(), "kernel left NaN (unwritten output or a read of a poisoned slot)"
    err = (got.float() - want.float()).abs().max().item()
    bound = TOL[q.dtype] * want.float().abs().max().item() + 1e-5
    assert err <= bound, f"max abs err {err:.3g} > {bound:.3g}"


GRID = [(ps, g, D) for ps in (16, 64, 256) for g in (1, 4, 8) for D in (64, 128)]
GRID += [(16, 4, 32), (64, 1, 32), (256, 8, 32)]  # head_dim 32: the demo model's


@pytest.mark.kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("page_size", "gqa", "head_dim"), GRID)
def test_decode_kernel_matches_ref(mode, page_size, gqa, head_dim):
    _need_ops()
    idx = GRID.index((page_size, gqa, head_dim))
    batch = (1, 3, 17)[idx % 3]
    act = (torch.float16, torch.bfloat16)[idx % 2]
    hkv = 8 if gqa == 1 else 2
    lengths = [random.randint(1, size(5000)) for _ in range(batch)]
    fp8_scale = 2.0 if mode == "fp8" else 1.0
    case = _make_case(lengths, page_size, gqa * hkv, hkv, head_dim, act, mode, fp8_scale=fp8_scale)
    q, kc, vc, tables, seq_lens, ks, vs = case
    _check(q, kc, vc, tables, seq_lens, page_size, None, ks, vs, fp8_scale)


@pytest.mark.kernels
@pytest.mark.parametrize("mode", ["fp16", "q4"])
@pytest.mark.parametrize("window", [None, 4096])
def test_decode_kernel_long_context(mode, window):
    _need_ops()
    lengths = [size(33000), random.randint(1, 700), random.randint(size(4000), size(9000))]
    case = _make_case(lengths, 256, 32, 8, 128, torch.bfloat16, mode)
    q, kc, vc, tables, seq_lens, ks, vs = case
    _check(q, kc, vc, tables, seq_lens, 256, window, ks, vs)


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("q_tokens", "gqa", "mode", "head_dim"),
    [(2, 1, "fp16", 128), (3, 4, "q8", 64), (4, 8, "fp16", 128), (4, 8, "fp8", 64), (3, 8, "q4", 128)]
    + [(2, 4, "q4", 32), (3, 8, "q8", 32)],
)
@pytest.mark.parametrize("window", [None, 300])
def test_decode_kernel_multi_query(q_tokens, gqa, mode, head_dim, window):
    """Speculative verification: Tq query tokens per sequence, causal among themselves (rows up to 32)."""
    _need_ops()
    lengths = [random.randint(q_tokens, size(3000)) for _ in range(5)]
    case = _make_case(lengths, 64, gqa * 2, 2, head_dim, torch.float16, mode, q_tokens=q_tokens)
    q, kc, vc, tables, seq_lens, ks, vs = case
    _check(q, kc, vc, tables, seq_lens, 64, window, ks, vs)


@pytest.mark.kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("q_tokens", "gqa", "head_dim"), [(1, 1, 128), (1, 3, 64), (5, 1, 32), (2, 4, 128), (3, 3, 64), (1, 2, 32)]
)
@pytest.mark.parametrize("window", [None, 13])
def test_decode_kernel_tile_boundaries(mode, q_tokens, gqa, head_dim, window):
    """The score phase splits each 32-token tile across the 4 warps (8 tokens each, a token's row across 4 lanes):
    one sequence per length q_tokens .. q_tokens + 40 ends the last, partial tile at every token of every warp's
    share, a window of 13 starts the first tile there too, and lengths around 64 and 128 cross partitions
    (the smallest is 64 tokens). Rows 1, 2, 3, 5, 8 (fewer than the warps, not a multiple of 4, a full small
    kernel) and 9 (the 32-row kernel, mostly empty); page size 1 puts every token of a tile on its own page."""
    _need_ops()
    lengths = list(range(q_tokens, q_tokens + 41)) + [63, 64, 65, 127, 129, 200]
    random.shuffle(lengths)
    page_size = random.choice([1, 16])
    act = random.choice([torch.float16, torch.bfloat16])
    fp8_scale = 0.5 if mode == "fp8" else 1.0
    case = _make_case(lengths, page_size, gqa * 2, 2, head_dim, act, mode, q_tokens=q_tokens, fp8_scale=fp8_scale)
    q, kc, vc, tables, seq_lens, ks, vs = case
    _check(q, kc, vc, tables, seq_lens, page_size, window, ks, vs, fp8_scale)


@pytest.mark.kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
def test_cache_write_kernel_matches_ref(mode, act):
    """Bit-exact: the kernel's shuffle butterfly adds in the same order as mixq.kernels.kv_quant.hadamard32, and the
    fp8 scales are powers of two so 1/scale is exact in both."""
    _need_ops()
    N, H, D, slots = 37, 8, 128, 300
    dev = DEV
    k, v = torch.randn(N, H, D, device=dev, dtype=act) * 3, torch.randn(N, H, D, device=dev, dtype=act)
    dt = code_dtype(mode, act)
    quant = mode in ("q8", "q4")

    def poisoned():
        nbytes = code_width(mode, D) * torch.empty(0, dtype=dt).element_size()
        c = torch.randint(0, 256, (slots, H, nbytes), dtype=torch.uint8, device=dev).view(dt)
        return c, (torch.rand(slots, H, D // GROUP, device=dev).half() if quant else None)

    slot_mapping = torch.randperm(slots, device=dev)[:N]
    slot_mapping[::5] = -1
    for idx_dtype in (torch.int64, torch.int32):
        (kc, ks), (vc, vs) = poisoned(), poisoned()
        want = [kc.clone(), vc.clone(), None if ks is None else ks.clone(), None if vs is None else vs.clone()]
        sm = slot_mapping.to(idx_dtype)
        torch.ops.mixq.paged_cache_write(k, v, kc, vc, sm, ks, vs, 2.0, 0.5)
        paged_cache_write_ref(k, v, want[0], want[1], sm, want[2], want[3], 2.0, 0.5)
        for g, w in zip((kc, vc, ks, vs), want):
            if g is not None:
                assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))  # also: skipped slots untouched


@pytest.mark.kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_cache_write_kernel_with_rope(mode, act, head_dim):
    """RoPE fused into the cache write: the stored k, its scales and q (rotated in place) are bit-equal to rope_qk's
    kernel followed by the plain write, and to the reference; k is left as it was, skipped slots are untouched and
    their q is still rotated. q is a strided view of a q/k/v output, as the model passes it."""
    _need_ops()
    N, Hq, H, D, slots = 29, 8, 2, head_dim, 100
    qkv = torch.randn(N, (Hq + 2 * H) * D, device=DEV, dtype=act) * 4
    q = qkv[:, : Hq * D].view(N, Hq, D)
    k, v = qkv[:, Hq * D :].view(N, 2 * H, D).split(H, dim=1)
    k, v = k.contiguous(), v.contiguous()
    angles = torch.rand(N, D, device=DEV) * 100  # any table: both halves differ, unlike HF's
    cos, sin = angles.cos().to(act), angles.sin().to(act)
    dt = code_dtype(mode, act)
    quant = mode in ("q8", "q4")
    nbytes = code_width(mode, D) * torch.empty(0, dtype=dt).element_size()

    def poisoned():
        c = torch.randint(0, 256, (slots, H, nbytes), dtype=torch.uint8, device=DEV).view(dt)
        return c, (torch.rand(slots, H, D // GROUP, device=DEV).half() if quant else None)

    sm = torch.randperm(slots, device=DEV)[:N]
    sm[::4] = -1
    (kc, ks), (vc, vs) = poisoned(), poisoned()
    two = [[t if t is None else t.clone() for t in (kc, vc, ks, vs)] for _ in range(2)]
    k0, q_ref, q_two = k.clone(), q.clone(), q.clone()

    torch.ops.mixq.paged_cache_write(k, v, kc, vc, sm, ks, vs, 2.0, 0.5, q, cos, sin)
    k_two = k.clone()
    torch.ops.mixq.rope_qk(q_two, k_two, cos, sin)
    c = two[0]
    torch.ops.mixq.paged_cache_write(k_two, v, c[0], c[1], sm, c[2], c[3], 2.0, 0.5)
    c = two[1]
    paged_cache_write_ref(k0, v, c[0], c[1], sm, c[2], c[3], 2.0, 0.5, q_ref, cos, sin)
    assert torch.equal(k, k0)
    for want_q, want in ((q_two, two[0]), (q_ref, two[1])):
        assert torch.equal(q, want_q)
        for g, w in zip((kc, vc, ks, vs), want):
            if g is not None:
                assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))


@pytest.mark.kernels
def test_cache_write_rope_arguments_checked():
    _need_ops()
    k = torch.randn(3, 2, 64, device=DEV, dtype=torch.float16)
    kc = torch.zeros(8, 2, 64, device=DEV, dtype=torch.float16)
    sm = torch.arange(3, device=DEV)
    cos = torch.ones(3, 64, device=DEV, dtype=torch.float16)
    q = torch.randn(3, 4, 64, device=DEV, dtype=torch.float16)
    bad = [
        ((None, cos, None), "both cos and sin"),
        ((q, None, None), "needs cos and sin"),
        ((None, cos[:2], cos[:2]), "cos/sin must be"),
        ((None, cos.float(), cos.float()), "cos/sin must be"),
        ((q[:2], cos, cos), "q must be"),
        ((torch.randn(3 * 4 * 64 + 1, device=DEV, dtype=torch.float16)[1:].view(3, 4, 64), cos, cos), "q must be"),
    ]
    for (qq, c, s), msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.mixq.paged_cache_write(k, k, kc, kc.clone(), sm, None, None, 1.0, 1.0, qq, c, s)


@pytest.mark.kernels
@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_cache_write_kernel_large_values_finite(mode):
    """|x| > 1e4 in fp16 (one sign per 32-group, so max |H x| = 32 |x|): the kernel's scales stay finite and equal
    the reference's, and decode attention over those tokens returns finite values (an inf scale read back as
    0 * inf = NaN before the scale was widened and clamped)."""
    _need_ops()
    N, H, D, slots = 6, 2, 128, 16
    sign = torch.where(torch.rand(N, H, D // 32, 1) < 0.5, -1.0, 1.0).expand(N, H, D // 32, 32).reshape(N, H, D)
    # up to 3e4, so that q4's reconstruction error (<= 40 % of a group's norm) keeps the fp16 output finite
    k = ((1.2e4 + 1.8e4 * torch.rand(N, H, D)) * sign).half().to(DEV)
    v = ((1.2e4 + 1.8e4 * torch.rand(N, H, D)) * sign).half().to(DEV)
    dt = code_dtype(mode, torch.float16)
    kc = torch.zeros(slots, H, code_width(mode, D), dtype=dt, device=DEV)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(slots, H, D // GROUP, dtype=torch.float16, device=DEV)
    vs = torch.zeros_like(ks)
    sm = torch.arange(N, device=DEV)
    torch.ops.mixq.paged_cache_write(k, v, kc, vc, sm, ks, vs, 1.0, 1.0)
    want_ks = torch.zeros_like(ks)
    want = [kc.clone().zero_(), vc.clone().zero_(), want_ks, want_ks.clone()]
    paged_cache_write_ref(k, v, *want[:2], sm, *want[2:], 1.0, 1.0)
    assert torch.isfinite(ks.float()).all() and torch.isfinite(vs.float()).all()
    for g, w in zip((kc, vc, ks, vs), want):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))
    q = torch.randn(1, 1, H, D, dtype=torch.float16, device=DEV) * 1e-4  # scores stay in range
    tables = torch.tensor([[0]], dtype=torch.int32, device=DEV)
    out = torch.ops.mixq.paged_decode_attention(
        q, kc, vc, tables, torch.tensor([N], dtype=torch.int32, device=DEV), slots, D**-0.5, 0, ks, vs, 1.0, 1.0
    )
    assert torch.isfinite(out.float()).all()


@pytest.mark.kernels
def test_zero_query_tokens():
    _need_ops()
    q, kc, vc, tables, seq_lens, ks, vs = _make_case([700, 5], 16, 8, 2, 64, torch.float16, "q8", q_tokens=2)
    out = torch.ops.mixq.paged_decode_attention(q[:, :0], kc, vc, tables, seq_lens, 16, 0.125, 0, ks, vs)
    assert out.shape == (2, 0, 8, 64)


@pytest.mark.kernels
def test_opcheck():
    _need_ops()
    for mode in ("fp16", "q4"):
        q, kc, vc, tables, seq_lens, ks, vs = _make_case([700, 5], 16, 8, 2, 64, torch.float16, mode)
        torch.library.opcheck(
            torch.ops.mixq.paged_decode_attention.default, (q, kc, vc, tables, seq_lens, 16, 0.125, 0, ks, vs, 1.0, 1.0)
        )
        k = torch.randn(3, 2, 64, device=DEV, dtype=torch.float16)
        sm = torch.tensor([0, 5, -1], device=DEV)
        torch.library.opcheck(torch.ops.mixq.paged_cache_write.default, (k, k.clone(), kc, vc, sm, ks, vs, 1.0, 1.0))
        q, cos = torch.randn(3, 8, 64, device=DEV, dtype=torch.float16), torch.rand(3, 64, device=DEV).half()
        rope = (q, cos, cos.flip(1).contiguous())
        torch.library.opcheck(
            torch.ops.mixq.paged_cache_write.default, (k, k.clone(), kc, vc, sm, ks, vs, 1.0, 1.0, *rope)
        )


@pytest.mark.cuda
@pytest.mark.kernels
@pytest.mark.parametrize(("q_tokens", "mode"), [(1, "fp16"), (4, "q4")])
def test_cuda_graph_replay_equals_eager(q_tokens, mode):
    """A decode step (cache write + attention) captured once and replayed with new data equals eager calls.
    q_tokens=4 with 4 query heads per KV head takes the 16-row kernel, whose shared memory needs the raised
    limit (set during the warm-up, not under capture)."""
    _need_ops()
    lengths = [random.randint(q_tokens, size(3000)) for _ in range(4)]
    q, kc, vc, tables, seq_lens, ks, vs = _make_case(lengths, 64, 32, 8, 128, torch.bfloat16, mode, q_tokens)
    n_new = len(lengths) * q_tokens
    k_new = torch.randn(n_new, 8, 128, device=DEV, dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    slot_mapping = torch.zeros(n_new, dtype=torch.int64, device=DEV)
    scale = 128**-0.5

    def step():
        torch.ops.mixq.paged_cache_write(k_new, v_new, kc, vc, slot_mapping, ks, vs)
        return torch.ops.mixq.paged_decode_attention(q, kc, vc, tables, seq_lens, 64, scale, 0, ks, vs)

    def new_inputs():
        lens = [random.randint(q_tokens, n) for n in lengths]  # only written tokens (the rest is NaN)
        pos = torch.tensor([p for n in lens for p in range(n - q_tokens, n)], device=DEV)
        rows = torch.arange(len(lens), device=DEV).repeat_interleave(q_tokens)
        slot_mapping.copy_(tables.long()[rows, pos // 64] * 64 + pos % 64)
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))

    new_inputs()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside capture (kernel attributes, allocator)
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):  # new contents in the same buffers
        new_inputs()
        graph.replay()
        eager = step()  # rewrites the same slots with the same values
        assert torch.equal(out, eager) and not out.isnan().any()


@pytest.mark.kernels
def test_dispatch_uses_kernel():
    _need_ops()
    q, kc, vc, tables, seq_lens, ks, vs = _make_case([100, 2000], 16, 8, 8, 64, torch.float16, "q8")
    got = paged_decode_attention(q, kc, vc, tables, seq_lens, 16, 0.125, None, ks, vs)
    want = torch.ops.mixq.paged_decode_attention(q, kc, vc, tables, seq_lens, 16, 0.125, 0, ks, vs)
    assert torch.equal(got, want) and math.isfinite(got.float().abs().max().item())
