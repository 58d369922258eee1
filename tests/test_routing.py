"""Reference semantics of routing and token grouping (mixq/kernels/ops.py *_ref), CPU only, against brute force."""

import math

import pytest
import torch

from mixq.kernels.ops import align_capacity, moe_align_ref, topk_softmax_ref


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


def brute_topk(row: list[float], k: int, renormalize: bool) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    for _ in range(k):  # first index wins among equal values
        best = max((e for e in range(len(row)) if e not in ids), key=lambda e: (row[e], -e))
        ids.append(best)
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    denom = sum(ex[e] for e in ids) if renormalize else sum(ex)
    return ids, [ex[e] / denom for e in ids]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,k", [(8, 2), (8, 1), (16, 4), (5, 5)])
def test_topk_softmax_ref_matches_brute_force_with_ties(E, k, renormalize):
    g = _gen()
    # few distinct values -> many ties
    logits = torch.randint(-3, 3, (40, E), generator=g).float() * 0.5
    w, ids = topk_softmax_ref(logits, k, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    for t in range(logits.shape[0]):
        bi, bw = brute_topk(logits[t].tolist(), k, renormalize)
        assert ids[t].tolist() == bi
        assert torch.allclose(w[t], torch.tensor(bw), rtol=1e-6, atol=1e-7)
    if renormalize:
        assert torch.allclose(w.sum(-1), torch.ones(logits.shape[0]))


def test_topk_softmax_ref_is_mixtral_routing():
    """softmax -> top-k -> renormalise (HF Mixtral) on tie-free logits (distinct values in every row)."""
    g = _gen()
    logits = (torch.stack([torch.randperm(8, generator=g) for _ in range(64)]) + torch.rand(64, 1, generator=g)) * 0.3
    w, ids = topk_softmax_ref(logits, 2)
    p = torch.softmax(logits.float(), -1)
    pw, pi = torch.topk(p, 2, -1)
    assert torch.equal(ids.long(), pi)
    assert torch.allclose(w, pw / pw.sum(-1, keepdim=True), rtol=1e-6)


def brute_align(ids: list[int], E: int, bm: int):
    groups = {e: [i for i, v in enumerate(ids) if v == e] for e in range(E)}
    rows, block_expert, positions = [], [], [-1] * len(ids)
    for e in range(E):
        pad = -(-len(groups[e]) // bm) * bm
        for j in range(pad):
            if j < len(groups[e]):
                positions[groups[e][j]] = len(rows)
                rows.append(groups[e][j])
            else:
                rows.append(len(ids))
        block_expert += [e] * (pad // bm)
    return [len(groups[e]) for e in range(E)], rows, block_expert, positions


@pytest.mark.parametrize("T,k,E,bm", [(1, 2, 8, 16), (7, 2, 8, 4), (33, 2, 8, 16), (100, 3, 5, 1), (0, 2, 8, 8)])
def test_moe_align_ref_matches_brute_force(T, k, E, bm):
    g = _gen()
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    if T > 2:
        ids[1, 0] = E  # an id outside [0, E) is dropped
    a = moe_align_ref(ids, E, bm)
    counts, rows, block_expert, positions = brute_align(ids.flatten().tolist(), E, bm)
    cap = align_capacity(T * k, E, bm)
    assert a.counts.tolist() == counts
    assert a.offsets[-1] <= cap and a.sorted_ids.numel() == cap and cap % bm == 0
    assert a.sorted_ids[: len(rows)].tolist() == rows
    assert (a.sorted_ids[len(rows) :] == T * k).all()
    assert a.block_expert[: len(block_expert)].tolist() == block_expert
    assert (a.block_expert[len(block_expert) :] == -1).all()
    assert a.positions.flatten().tolist() == positions
    assert a.positions.shape == ids.shape
