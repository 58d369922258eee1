"""Routing / grouping kernels vs the references in mixq/ops.py (GPU with mixq._C, or the CPU kernel emulation)."""

import pytest
import torch
from kernel_env import DEV, poison_allocator

from mixq.kernels import ops

pytestmark = pytest.mark.kernels


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (7, 8, 2), (33, 8, 1), (1000, 8, 2), (64, 64, 6), (5, 3, 3)])
def test_topk_softmax(T, E, k, renormalize):
    g = _gen()
    logits = torch.randint(-4, 4, (T, E), generator=g).float() * 0.25  # many exact ties
    logits[: T // 2] += torch.randn(T // 2, E, generator=g)
    poison_allocator()
    w, ids = ops.topk_softmax(logits.to(DEV), k, renormalize)
    rw, rids = ops.topk_softmax_ref(logits, k, renormalize)
    assert torch.equal(ids.cpu(), rids)
    assert torch.allclose(w.cpu(), rw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,H,E", [(1, 4096, 8), (8, 4096, 8), (33, 6144, 8), (300, 256, 64), (2, 2, 1)])
def test_moe_router(T, H, E, dtype):
    g = _gen()
    x = torch.randn(T, H, generator=g).to(dtype).to(DEV)
    w = (torch.randn(E, H, generator=g) * H**-0.5).to(dtype).to(DEV)
    poison_allocator()
    logits, wts, ids = ops.moe_router(x, w, min(2, E))
    ref = x.double() @ w.double().t()
    err = float((logits.double() - ref).norm() / ref.norm())
    assert err <= 1e-5, err
    # selection semantics on the kernel's own logits (near-ties may legitimately differ from fp64)
    rw, rids = ops.topk_softmax_ref(logits.cpu(), min(2, E))
    assert torch.equal(ids.cpu(), rids)
    assert torch.allclose(wts.cpu(), rw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "T,k,E,bm",
    [
        (1, 2, 8, 16),
        (7, 2, 8, 8),
        (33, 2, 8, 64),
        (1000, 2, 8, 16),
        (4096, 2, 8, 64),
        (257, 6, 64, 16),
        (100, 3, 5, 1),
        (3, 2, 40, 32),
    ],
)
def test_moe_align(T, k, E, bm):
    g = _gen()
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    ids[0, -1] = E + 3  # dropped
    poison_allocator()
    a = ops.moe_align(ids.to(DEV), E, bm)
    r = ops.moe_align_ref(ids, E, bm)
    for name in ("counts", "offsets", "sorted_ids", "block_expert", "positions"):
        assert torch.equal(getattr(a, name).cpu(), getattr(r, name)), name


@pytest.mark.cuda
def test_graph_capture_routing():
    g = _gen()
    x = torch.randn(4, 512, generator=g).half().to(DEV)
    w = torch.randn(8, 512, generator=g).half().to(DEV)
    ops.moe_router(x, w, 2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, wts, ids = ops.moe_router(x, w, 2)
        a = ops.moe_align(ids, 8, 16)
    x.copy_(torch.randn(4, 512, generator=g).half())
    graph.replay()
    torch.cuda.synchronize()
    r = ops.moe_align_ref(ids.cpu(), 8, 16)
    assert torch.equal(a.sorted_ids.cpu(), r.sorted_ids)
    assert torch.equal(ids.cpu(), ops.topk_softmax_ref(logits.cpu(), 2)[1])


def test_opcheck():
    g = _gen()
    logits = torch.randn(5, 8, generator=g).to(DEV)
    torch.library.opcheck(torch.ops.mixq.topk_softmax.default, (logits, 2, True))
    x = torch.randn(5, 64, generator=g).half().to(DEV)
    w = torch.randn(8, 64, generator=g).half().to(DEV)
    torch.library.opcheck(torch.ops.mixq.moe_router.default, (x, w, 2, True))
    ids = torch.randint(0, 8, (5, 2), generator=g, dtype=torch.int32).to(DEV)
    torch.library.opcheck(torch.ops.mixq.moe_align.default, (ids, 8, 4))
