"""The MoE kernels' stream-K plan (csrc/moe/moe_kernels.h MoePlan, mirrored by bench/static_model.py, the same
integer expressions): every K tile of every output tile is walked by exactly one CTA, the pieces of an output tile
are consecutive CTAs numbered from 0 in tile order, fewer than max_pieces (the partial buffer's planes), and every
CTA gets the same number of tiles to within one. The kernels themselves are checked against the reference with
forced grids that cut output tiles anywhere (tests/test_moe_kernels.py::test_forced_grids)."""

from __future__ import annotations

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.static_model import MoePlan, moe_plan  # noqa: E402


def _check(plan: MoePlan) -> None:
    seen: dict[int, list[tuple[int, int, int, int]]] = {}
    sizes = []
    for c in range(plan.ctas):
        pieces = plan.ranges(c)
        sizes.append(sum(hi - lo for _, lo, hi in pieces))
        for u, lo, hi in pieces:
            assert 0 <= lo < hi <= plan.unit_tiles
            piece = c - plan.owner(u * plan.unit_tiles)
            seen.setdefault(u, []).append((piece, lo, hi, c))
    assert max(sizes) - min(sizes) <= 1, "unequal shares"
    assert sorted(seen) == list(range(plan.units))
    for u, got in seen.items():
        assert [p for p, *_ in got] == list(range(len(got))), "pieces numbered 0.. in order"
        assert len(got) == plan.pieces(u) <= plan.max_pieces
        assert [lo for _, lo, _, _ in got] == [0] + [hi for _, _, hi, _ in got[:-1]], "gaps or overlaps"
        assert got[-1][2] == plan.unit_tiles


@pytest.mark.parametrize("seed", range(6))
def test_random_grids_cover_every_tile_once(seed):
    rng = random.Random(seed * 7919 + random.randrange(10**6))
    for _ in range(40):
        units, tiles = rng.randint(1, 60), rng.randint(1, 70)
        ctas = rng.randint(1, units * tiles)
        length = units * tiles // ctas
        max_pieces = 1 if tiles < 2 else min((tiles - 2) // length + 2, ctas)
        _check(MoePlan(1, 1, units, tiles, ctas, max_pieces))


@pytest.mark.parametrize(
    "K,N,blocks,bm,proj",
    [(4096, 14336, 8, 8, 2), (4096, 14336, 2, 1, 2), (14336, 4096, 8, 8, 1), (14336, 4096, 2, 1, 1),
     (6144, 16384, 8, 8, 2), (4096, 14336, 300, 8, 2)],
)  # fmt: skip
def test_mixtral_plans(K, N, blocks, bm, proj):
    plan = moe_plan(K, N, blocks * bm, blocks, bm, proj, sms=132, occ=3)
    assert plan.ctas <= 396 or plan.ctas == plan.units  # one wave, or whole tiles from two waves on
    _check(plan)
