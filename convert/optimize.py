"""Choose one measured option per slot (attention or MoE block of each layer) under a bit budget.

`solve` is a multiple-choice knapsack solved by dynamic programming over the budget cut into
`resolution` units. Option costs are rounded UP to whole units, so any solution it returns is within
the true budget; it is exactly optimal for the rounded costs, and the rounding loses at most one unit
per slot. The objective is the sum of the slots' relative output errors (errors of successive blocks
add up, to first order, in the residual stream).

`anneal` re-implements the procedure exllamav2 describes (simulated annealing on Σ err^norm with the
norm chosen to minimise the worst slot) so the two can be compared on the same measurements.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from mixq.errors import MixqError


@dataclass(frozen=True)
class Option:
    bits: int  # total bits of the block's matrices, overhead included
    err: float  # 1 - accuracy of the block output


def solve(slots: list[list[Option]], budget: int, resolution: int = 20000) -> list[int]:
    """Indices (one per slot) minimising Σ err subject to Σ bits ≤ budget."""
    if sum(min(o.bits for o in s) for s in slots) > budget:
        raise MixqError("the target bpw is below what the smallest candidate recipes reach; raise --bits")
    unit = budget / resolution
    inf = float("inf")
    dp = np.full(resolution + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((len(slots), resolution + 1), dtype=np.int16)
    for s, options in enumerate(slots):
        new = np.full(resolution + 1, inf)
        for j, opt in enumerate(options):
            c = math.ceil(opt.bits / unit - 1e-9)
            if c > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[c:] = dp[: resolution + 1 - c] + opt.err
            better = cand < new
            new[better] = cand[better]
            choice[s, better] = j
        dp = new
    if not np.isfinite(dp).any():
        raise MixqError("the target bpw is below what the smallest candidate recipes reach; raise --bits")
    u = int(np.argmin(dp))
    picks = [0] * len(slots)
    for s in range(len(slots) - 1, -1, -1):
        j = int(choice[s, u])
        picks[s] = j
        u -= math.ceil(slots[s][j].bits / unit - 1e-9)
    return _spend_leftover(slots, picks, budget)


def _spend_leftover(slots: list[list[Option]], picks: list[int], budget: int) -> list[int]:
    """Greedy polish: take any single-slot change that lowers the error and still fits."""
    used = sum(slots[s][j].bits for s, j in enumerate(picks))
    improved = True
    while improved:
        improved = False
        best = None
        for s, options in enumerate(slots):
            cur = options[picks[s]]
            for j, opt in enumerate(options):
                gain = cur.err - opt.err
                if gain > 1e-12 and used - cur.bits + opt.bits <= budget and (best is None or gain > best[0]):
                    best = (gain, s, j)
        if best:
            _, s, j = best
            used += slots[s][j].bits - slots[s][picks[s]].bits
            picks[s] = j
            improved = True
    return picks


def anneal(
    slots: list[list[Option]], budget: int, seed: int = 0, runs_per_stage: int = 80, steps: int = 1000
) -> list[int]:
    """exllamav2's optimizer as its notes describe it (three annealing stages over the norm)."""
    rng = random.Random(seed)

    def one(norm: float) -> list[int]:
        picks = [0] * len(slots)
        used = sum(s[0].bits for s in slots)
        temp = 2.0
        while temp > 1e-4:
            for _ in range(steps):
                s = rng.randrange(len(slots))
                j = rng.randrange(len(slots[s]))
                cur, new = slots[s][picks[s]], slots[s][j]
                if used - cur.bits + new.bits > budget:
                    continue
                delta = new.err**norm - cur.err**norm
                if delta < 0 or rng.random() < math.exp(-delta / temp):
                    picks[s], used = j, used - cur.bits + new.bits
            temp *= 0.995
        return _spend_leftover(slots, picks, budget)

    def worst(p: list[int]) -> float:
        return max(slots[s][j].err for s, j in enumerate(p))

    norms = [1.5 + 2.0 * i / max(runs_per_stage - 1, 1) for i in range(runs_per_stage)]
    best_norm = min(norms, key=lambda n: worst(one(n)))
    norms = [best_norm - 0.075 + 0.15 * i / max(runs_per_stage - 1, 1) for i in range(runs_per_stage)]
    best_norm = min(norms, key=lambda n: worst(one(n)))
    sols = [one(best_norm) for _ in range(runs_per_stage)]
    return min(sols, key=lambda p: sum(slots[s][j].err ** best_norm for s, j in enumerate(p)))


def total(slots: list[list[Option]], picks: list[int]) -> tuple[int, float, float]:
    """(bits, Σ err, max err) of a choice."""
    chosen = [slots[s][j] for s, j in enumerate(picks)]
    return sum(o.bits for o in chosen), sum(o.err for o in chosen), max(o.err for o in chosen)
