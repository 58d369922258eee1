"""Grouped EXL2 expert matmul (mixq.kernels.moe, csrc/moe/moe_gemm.cu).

CPU part (always runs): prepare_moe bookkeeping (per-expert offsets, bit-exact codes and weights of every
expert's slice), moe_forward_ref vs mixq.model.mixtral.SparseMoE, fake impls. Kernel part (a GPU with mixq._C, or the
CPU kernel emulation; skipped otherwise): the kernels vs the fp32 reference on the same routing, rel. Frobenius
error <= 2e-3, outputs poisoned first. The two chained GEMMs sum in fp32 (csrc/exl2/gemm_tiles.cuh); the
intermediate and the outputs are rounded to fp16: 3.3-4.7e-4 measured under the emulation (1.2-1.4e-3 while the
kernels kept fp16 partial sums); the bound also covers the prefill paths.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from kernel_env import DEV, full_size, poison_allocator, sync

from mixq.errors import FormatError
from mixq.exl2.layout import unpack_prepared
from mixq.exl2.pack import unpack_q_weight
from mixq.exl2.qparams import QPARAMS_MLP, parse_recipe
from mixq.exl2.reference import dequantize
from mixq.kernels import moe, ops
from mixq.kernels.moe import route
from mixq.model.exl2_linear import Exl2Linear
from mixq.model.mixtral import DenseLinear, Expert, SparseMoE
from mixq.synthetic.exl2_layer import random_exl2

WIDTHS = (2, 3, 4, 5, 6, 8)
MLP_ROWS = [tuple(str(r[p]) for p in ("w1", "w3", "w2")) for r in QPARAMS_MLP]


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


def make_experts(E, H, inter, recipes, g, shared_perm=False):
    """E random EXL2 experts (CPU); `recipes` = (w1, w3, w2) recipe strings; w1/w3 share one act-order
    permutation across all experts when `shared_perm`."""
    shared = torch.randperm(H, generator=g)
    experts = []
    for e in range(E):
        lin = {}
        for name, (K, N), rec in zip(("w1", "w3", "w2"), ((H, inter), (H, inter), (inter, H)), recipes):
            t = random_exl2(K, N, parse_recipe(rec), generator=g, scale=0.05)
            if shared_perm and name != "w2":
                t.q_invperm = shared.clone().to(t.q_invperm.dtype)
            lin[name] = Exl2Linear(t, f"experts.{e}.{name}")
        experts.append(Expert(lin["w1"], lin["w2"], lin["w3"]))
    return experts


def make_moe(E, k, H, inter, recipes, g, shared_perm=False):
    experts = make_experts(E, H, inter, recipes, g, shared_perm)
    gate = DenseLinear(torch.randn(E, H, generator=g))
    return SparseMoE(SimpleNamespace(num_experts_per_tok=k), gate, experts)


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("shared_perm", [False, True])
def test_prepare_moe_bookkeeping(shared_perm):
    g = _gen()
    E, H, inter = 4, 256, 192
    recipes = ("0.1:8b_32g/0.9:4b_64g", "0.25:6b_32g/0.75:3b_32g", "0.05:8b_32g/0.1:5b_32g/0.85:2b_32g")
    experts = make_experts(E, H, inter, recipes, g, shared_perm)
    p = moe.prepare_moe(experts)
    assert (p.num_experts, p.hidden_size, p.intermediate_size) == (E, H, inter)
    assert (p.x_perm is not None) == shared_perm and (p.w1.perm is None) == shared_perm and p.w2.perm is None
    for name in ("w1", "w3", "w2"):
        s = getattr(p, name)
        offs = s.offsets()
        for key in ("qweight", "qscale", "scale_max", "tile_group"):
            per = getattr(s, key)[0].numel()
            assert offs[key] == [e * per for e in range(E + 1)] and offs[key][-1] == getattr(s, key).numel()
        for e, ex in enumerate(experts):
            t = getattr(ex, name).exl2
            W, N = s.qweight.shape[1:]
            o = offs["qweight"][e]
            words = s.qweight.view(-1)[o : o + W * N].view(W, N)
            codes = unpack_q_weight(t.q_weight, t.group_bits)  # stored row order, original columns
            w = dequantize(t)  # original row order, original columns
            if name == "w2":
                cols = torch.arange(H)
            else:  # intermediate columns in w2's stored row order
                cols = torch.argsort(experts[e].w2.q_invperm.long())
            assert torch.equal(unpack_prepared(words, s.seg_bits, s.seg_rows), codes[:, cols])
            dq = ops.exl2_dequant_ref(s.expert(e))
            rows = torch.argsort(t.q_invperm.long())  # stored row k reads original feature rows[k]
            expect = w[:, cols] if s.perm is not None else w[rows][:, cols]
            assert torch.equal(dq.view(torch.int16), expect.view(torch.int16))
            if name != "w2" and shared_perm:
                assert torch.equal(p.x_perm, rows)


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 2)])
@pytest.mark.parametrize("shared_perm", [False, True])
def test_moe_forward_ref_matches_sparse_moe(E, k, shared_perm):
    g = _gen()
    H, inter = 128, 96
    recipes = ("0.1:6b_32g/0.9:4b_32g", "4b_32g", "0.25:5b_32g/0.75:3b_32g")
    layer = make_moe(E, k, H, inter, recipes, g, shared_perm)
    p = moe.prepare_moe(list(layer.experts))
    for T in (1, 5, 37):
        x = torch.randn(T, H, generator=g)
        ref = layer(x)
        y = moe.moe_forward_ref(x, layer.gate.weight, p, k)
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        res = torch.randn(T, H, generator=g)
        y2 = moe.moe_forward(x, layer.gate.weight, p, k, residual=res)  # CPU: the reference
        assert torch.allclose(y2, ref + res, rtol=1e-4, atol=1e-4)
    assert layer._fused is None  # CPU never builds the fused path


def test_prepare_moe_rejects_what_the_kernels_cannot_take():
    g = _gen()
    experts = make_experts(2, 64, 64, ("4b_32g", "4b_32g", "4b_32g"), g)
    other = make_experts(1, 64, 64, ("3b_32g", "4b_32g", "4b_32g"), g)
    with pytest.raises(FormatError, match=r"experts\.1\.w1"):
        moe.prepare_moe([experts[0], other[0]])
    dense = Expert(DenseLinear(torch.randn(64, 64)), DenseLinear(torch.randn(64, 64)), DenseLinear(torch.randn(64, 64)))
    with pytest.raises(FormatError, match="not an EXL2 layer"):
        moe.prepare_moe([experts[0], dense])
    if not ops.cuda_ops_available():
        assert moe.prepare_for_model(experts, torch.device("cpu")) is None


@pytest.mark.skipif(not ops.extension_loaded(), reason="mixq._C is not built")
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = _gen()
    E, H, inter, T, k = 4, 64, 96, 5, 2
    p = moe.prepare_moe(make_experts(E, H, inter, ("4b_32g", "3b_32g", "0.5:6b_32g/0.5:4b_32g"), g))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:

        def f(a):
            return None if a is None else mode.from_tensor(a)

        ids = f(torch.zeros(T, k, dtype=torch.int32))
        x = f(torch.empty(T, H, dtype=torch.float16))
        w1 = [f(a) for a in p.w1.args()]
        w3 = [f(a) for a in p.w3.args()]
        w2 = [f(a) for a in p.w2.args(False)]
        sched = (*p.w1.schedule(), *w3, *p.w3.schedule())
        inter_t = torch.ops.mixq.moe_gate_up(x, ids, None, None, 8, *w1, *sched, 0)
        assert tuple(inter_t.shape) == (min(E, T * k) * 8, inter) and inter_t.dtype == torch.float16
        cap = ops.align_capacity(T * k, E, 8)
        si, be = f(torch.zeros(cap, dtype=torch.int32)), f(torch.zeros(cap // 8, dtype=torch.int32))
        inter_a = torch.ops.mixq.moe_gate_up(x, ids, si, be, 8, *w1, *sched, 0)
        assert tuple(inter_a.shape) == (cap, inter)
        y = torch.ops.mixq.moe_down(inter_a, f(torch.empty(T, k)), ids, si, be, ids, 8, *w2, *p.w2.schedule(), None, 0)
        assert tuple(y.shape) == (T, H) and y.dtype == torch.float16
        z = torch.ops.mixq.moe_finalize(f(torch.empty(T * k, H, dtype=torch.float16)), f(torch.empty(T, k)), ids)
        assert tuple(z.shape) == (T, H)


# ---------------------------------------------------------------- kernels

# 2048 tokens: the GPU only (the emulation covers the same tiles and paths at 1000, in a third of the time).
TOKENS = [1, 2, 3, 4, 7, 8, 9, 16, 33, 64, 255, 256, 1000, pytest.param(2048, marks=full_size)]
TOL = 2e-3  # two GEMMs in series, each within the single GEMM's 1.5e-3 (tests/test_kernels_exl2.py): module docstring


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def kernel_layer(E, H, inter, recipes, g, shared_perm=True):
    experts = make_experts(E, H, inter, recipes, g, shared_perm)
    return moe.prepare_moe(experts, DEV)


def random_routing(T, E, k, g):
    logits = torch.randn(T, E, generator=g)
    w, ids = route(logits, k)
    return w.to(DEV), ids.to(DEV)


# bf16 in and out: x is staged as fp16 (exact for these magnitudes: bf16's 8 bits fit fp16's 11), the output is
# rounded to bf16 (relative 2^-9 rms-ish per element) on top of the fp16 path's error.
TOL_BF16 = 5e-3


def check(x, w, ids, p, residual=None, **kw):
    poison_allocator()
    y = moe.moe_experts(x, w, ids, p, residual=residual, **kw)
    sync()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or overflowing outputs"
    ref = moe.moe_experts_ref(x.float(), w, ids, p, residual=None if residual is None else residual.float())
    err = rel_err(y, ref)
    tol = TOL_BF16 if x.dtype == torch.bfloat16 else TOL
    assert err <= tol, f"rel err {err:.2e}"
    return y


@pytest.mark.kernels
@pytest.mark.parametrize("T", [1, 3, 8, 40])
def test_bf16_in_and_out(T):
    """A bf16 model's activations go into the kernels as they are (no cast launches) and come out in bf16, the
    residual included; decode (T <= 8, the fused epilogue) and aligned prefill (finalize_kernel)."""
    g = _gen()
    p = kernel_layer(8, 512, 512, ("0.1:8b_32g/0.9:4b_32g", "4b_128g", "0.05:6b_32g/0.95:3b_32g"), g)
    w, ids = random_routing(T, 8, 2, g)
    x = torch.randn(T, 512, generator=g).bfloat16().to(DEV)
    res = (torch.randn(T, 512, generator=g) * 1e5).bfloat16().to(DEV)  # beyond fp16's range: must survive
    y = check(x, w, ids, p, residual=res, dense_rows_per_expert=10**9)
    assert (y.float().abs() > 65504).any(), "the bf16 residual was clipped to fp16's range"


@pytest.mark.kernels
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 1), (8, 2)])
def test_token_counts(T, E, k):
    g = _gen()
    p = kernel_layer(E, 512, 1024, MLP_ROWS[len(MLP_ROWS) // 2], g)
    w, ids = random_routing(T, E, k, g)
    check(torch.randn(T, 512, generator=g).half().to(DEV), w, ids, p)


@pytest.mark.kernels
@pytest.mark.parametrize("recipes", [(f"{b}b_32g",) * 3 for b in WIDTHS] + MLP_ROWS)
def test_every_recipe(recipes):
    g = _gen()
    p = kernel_layer(4, 512, 768, recipes, g, shared_perm=False)
    for T in (1, 3, 8, 40, 300):
        w, ids = random_routing(T, 4, 2, g)
        check(torch.randn(T, 512, generator=g).half().to(DEV), w, ids, p)


@pytest.mark.kernels
@pytest.mark.parametrize("T", [1, 4, 8, 9, 64, 256])
def test_one_expert_takes_everything_and_residual(T):
    g = _gen()
    E = 8
    p = kernel_layer(E, 256, 512, ("0.1:8b_32g/0.9:4b_32g", "4b_128g", "0.05:8b_32g/0.95:3b_32g"), g)
    x = torch.randn(T, 256, generator=g).half().to(DEV)
    res = torch.randn(T, 256, generator=g).half().to(DEV)
    one = torch.full((T, 1), 5, dtype=torch.int64, device=DEV)
    check(x, torch.ones(T, 1, device=DEV), one, p, residual=res)
    two = torch.cat([one, torch.full_like(one, 2)], 1)  # experts 0, 1, 3, 4, 6, 7 get no token
    check(x, torch.rand(T, 2, generator=g).to(DEV), two, p, residual=res)


@pytest.mark.kernels
@pytest.mark.parametrize("path", ["aligned", "dense"])
@pytest.mark.parametrize("T", [9, 100, 1000])
def test_prefill_paths(path, T):
    g = _gen()
    p = kernel_layer(8, 512, 512, ("0.25:5b_32g/0.75:4b_32g", "3b_32g", "0.1:6b_32g/0.9:2b_32g"), g, shared_perm=False)
    w, ids = random_routing(T, 8, 2, g)
    rows = 10**9 if path == "aligned" else 0
    check(torch.randn(T, 512, generator=g).half().to(DEV), w, ids, p, dense_rows_per_expert=rows)


@pytest.mark.kernels
@pytest.mark.parametrize("ctas", [1, 2, 3, 7, 45, 1000])
def test_forced_grids(ctas):
    """The stream-K grid forced to any size: one CTA walking every output tile, ranges that start and end inside
    output tiles (3, 7, 45: an output tile's pieces come from 1 to several CTAs, some CTAs finish one tile and
    start the next), and one K tile per CTA (1000, capped at the tiles there are)."""
    g = _gen()
    p = kernel_layer(4, 1024, 512, ("0.1:8b_32g/0.2:6b_64g/0.7:4b_32g", "5b_32g", "0.3:5b_32g/0.7:3b_32g"), g)
    for T in (1, 6, 20):
        w, ids = random_routing(T, 4, 2, g)
        check(torch.randn(T, 1024, generator=g).half().to(DEV), w, ids, p, ctas=ctas)


@pytest.mark.kernels
def test_one_cta_walks_chunks_and_segments():
    """One CTA over K = 2048: it stages x twice (32-tile chunks) per output tile and crosses width segments inside
    and across chunks, so the weight ring (csrc/exl2/weight_ring.cuh) restarts at every chunk and segment; runs of
    1-2 tiles (fewer than the ring's depth) at the segment edges."""
    g = _gen()
    rec = "0.01:8b_32g/0.3:6b_32g/0.01:5b_32g/0.68:4b_32g"  # 1, 20, 1 and 42 of the 64 tiles
    p = kernel_layer(2, 2048, 512, (rec, "0.5:5b_32g/0.5:3b_32g", "0.02:8b_32g/0.98:2b_32g"), g)
    for T in (1, 5):
        w, ids = random_routing(T, 2, 2, g)
        check(torch.randn(T, 2048, generator=g).half().to(DEV), w, ids, p, ctas=1)


@pytest.mark.kernels
@full_size
@pytest.mark.parametrize("shape", [(4096, 14336), (6144, 16384)])
def test_mixtral_shapes(shape):
    g = _gen()
    H, inter = shape
    p = kernel_layer(
        2, H, inter, ("0.1:4b_128g/0.9:3b_128g", "0.25:4b_128g/0.75:3b_128g", "0.05:8b_32g/0.95:4b_128g"), g
    )
    for T in (1, 8, 40):
        w, ids = random_routing(T, 2, 2, g)
        check(torch.randn(T, H, generator=g).half().to(DEV), w, ids, p)


@pytest.mark.kernels
def test_sparse_moe_uses_fused_path(caplog):
    g = _gen()
    layer = make_moe(8, 2, 256, 384, ("4b_32g", "0.5:5b_32g/0.5:4b_32g", "3b_32g"), g, shared_perm=True)
    layer = layer.to(DEV)
    layer.gate.half()
    x = torch.randn(13, 256, generator=g).half().to(DEV)
    with caplog.at_level(logging.INFO, logger="mixq"):
        y = layer(x)
    assert layer._fused, "SparseMoE on the kernel device with EXL2 experts must take the fused path"
    w, ids = route(layer.gate(x), 2)
    ref = moe.moe_experts_ref(x.float(), w, ids, layer._fused)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL


@pytest.mark.cuda
@pytest.mark.kernels
@pytest.mark.parametrize("T", [1, 4, 8])
def test_graph_replay_equals_eager(T):
    g = _gen()
    p = kernel_layer(8, 512, 1024, ("0.05:8b_32g/0.95:4b_128g",) * 3, g)
    router = torch.randn(8, 512, generator=g).half().to(DEV)
    x = torch.randn(T, 512, generator=g).half().to(DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe.moe_forward(x, router, p, 2)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = moe.moe_forward(x, router, p, 2)
    x.copy_(torch.randn(T, 512, generator=g).half())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, moe.moe_forward(x, router, p, 2))


@pytest.mark.kernels
@pytest.mark.parametrize("T,rows", [(1, 32), (8, 32), (100, 10**9), (300, 0)])
def test_deterministic(T, rows):
    g = _gen()
    p = kernel_layer(8, 512, 1024, ("0.1:5b_32g/0.9:4b_32g",) * 3, g)
    w, ids = random_routing(T, 8, 2, g)
    x = torch.randn(T, 512, generator=g).half().to(DEV)
    first = moe.moe_experts(x, w, ids, p, dense_rows_per_expert=rows)
    for _ in range(3):
        poison_allocator()
        assert torch.equal(moe.moe_experts(x, w, ids, p, dense_rows_per_expert=rows), first)


@pytest.mark.kernels
def test_opcheck():
    g = _gen()
    p = kernel_layer(4, 256, 256, ("0.1:6b_32g/0.9:3b_32g",) * 3, g, shared_perm=False)
    T, k = 3, 2
    w, ids = random_routing(T, 4, k, g)
    ids = ids.int()
    x = torch.randn(T, 256, generator=g).half().to(DEV)
    s1, s3, s2 = p.w1.schedule(), p.w3.schedule(), p.w2.schedule()
    gu = torch.ops.mixq.moe_gate_up.default
    torch.library.opcheck(gu, (x, ids, None, None, 4, *p.w1.args(), *s1, *p.w3.args(), *s3, 0))
    poison_allocator()
    inter = gu(x, ids, None, None, 4, *p.w1.args(), *s1, *p.w3.args(), *s3, 0)
    assert torch.isfinite(inter).all(), "rows of idle blocks (fewer experts than blocks) must be written too"
    torch.library.opcheck(
        torch.ops.mixq.moe_down.default, (inter, w, ids, None, None, None, 4, *p.w2.args(False), *s2, None, 0)
    )
    al = ops.moe_align(ids, 4, 8)
    inter_a = gu(x, ids, al.sorted_ids, al.block_expert, 8, *p.w1.args(), *s1, *p.w3.args(), *s3, 2)
    args = (inter_a, w, ids, al.sorted_ids, al.block_expert, al.positions, 8, *p.w2.args(False), *s2, x, 2)
    torch.library.opcheck(torch.ops.mixq.moe_down.default, args)
    rows = torch.randn(T * k, 256, generator=g).half().to(DEV)
    al1 = ops.moe_align(ids, 4, 1)  # block_m 1: positions index exactly the T * k assignment rows
    torch.library.opcheck(torch.ops.mixq.moe_finalize.default, (rows, w, al1.positions, None))
