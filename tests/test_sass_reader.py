"""bench/sass.py's loop figures on hand-written SASS (no extension needed): how many tiles of weight loads a hot
loop keeps in flight, with and without a cp.async ring, counted once whichever side of the wait the copies sit."""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.sass import Instr, Loop  # noqa: E402


def loop(ops: list[str]) -> Loop:
    body = []
    for k, op in enumerate(ops):
        text = {"WAIT2": "DEPBAR.LE SB0, 0x2", "WAIT1": "DEPBAR.LE SB0, 0x1"}.get(op, op)
        body.append(Instr(16 * k, text.split()[0], f"/*{16 * k:04x}*/ {text} ;"))
    return Loop(0, len(body) - 1, body)


COPY, LDG, MATH = "LDGSTS.E.BYPASS.128", "LDG.E.EF.128", "HFMA2"


def test_copies_before_the_wait_count_as_its_pending_groups():
    n = random.randint(20, 200)
    b = random.choice([2, 3, 4, 5, 6, 8])
    before = loop([COPY] * b + ["LDGDEPBAR", "WAIT2"] + [MATH] * n + ["BRA"])  # issue, then wait (the ring)
    after = loop(["WAIT1"] + [COPY] * b + ["LDGDEPBAR"] + [MATH] * n + ["BRA"])  # wait, then issue
    for lp, pending in ((before, 2), (after, 1)):
        assert len(lp.weight_loads) == b
        assert lp.pending_groups == pending
        assert lp.pending_groups + lp.loads_after_wait == 2.0


def test_register_loads_count_the_math_after_them():
    n = random.randint(20, 200)
    at = random.randint(1, n - 1)  # plain loads placed `at` math instructions into the body
    lp = loop([MATH] * at + [LDG] * 4 + [MATH] * (n - at) + ["BRA"])
    assert lp.pending_groups == 0
    assert abs(lp.loads_after_wait - (n - at) / n) < 1e-9
    assert lp.loads_after_wait == lp.math_after_loads
