"""Candidate recipes per block: exllamav2's tables, plus mixq rows that fill their larger bpw gaps.

exllamav2's MoE table jumps from 3.62 to 4.14 bpw (and 6.87 to 8.04), so a model with few layers cannot
land near some targets; and on small matrices (K of a few hundred) its lowest rows round their 5-10%
high-bit fraction up to a whole group, so plain 2-bit rows are needed to reach ~2.5 bpw. The extra rows
are ordinary EXL2 recipes (bits non-increasing, 32-multiple groups), so the files still load in
exllamav2; measurement.json lists them like any other option.
"""

from __future__ import annotations

from mixq.exl2.qparams import QPARAMS_ATTN, QPARAMS_MLP, QParams, parse_recipe

ATTN_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")
MOE_KEYS = ("w1", "w3", "w2")

_EXTRA_ATTN = [
    "1:2b_64g",
    ".5:4b_128g/.5:3b_128g",
    ".5:5b_128g/.5:4b_128g",
    "1:5b_128g",
    ".5:6b_128g/.5:5b_128g",
    ".5:8b_128g/.5:6b_128g",
]

_EXTRA_MOE = [  # (w1 and w3, w2)
    ("1:2b_64g", "1:2b_64g"),  # reachable floor for small matrices, where 5% of rows round up to a whole group
    (".25:3b_64g/.75:2b_64g", ".05:4b_32g/.25:3b_64g/.7:2b_64g"),
    ("1:3b_64g", ".05:4b_32g/.95:3b_64g"),
    (".5:4b_128g/.5:3b_128g", ".05:8b_32g/.45:4b_128g/.5:3b_128g"),
    (".75:4b_128g/.25:3b_128g", ".05:8b_32g/.7:4b_128g/.25:3b_128g"),
    ("1:4b_128g", ".05:6b_32g/.95:4b_128g"),
    (".5:5b_128g/.5:4b_128g", ".05:8b_32g/.45:5b_128g/.5:4b_128g"),
    (".75:5b_128g/.25:4b_128g", ".05:8b_32g/.7:5b_128g/.25:4b_128g"),
    ("1:5b_128g", ".05:8b_32g/.95:5b_128g"),
    (".5:6b_128g/.5:5b_128g", ".05:8b_32g/.45:6b_128g/.5:5b_128g"),
    (".5:8b_128g/.5:6b_128g", ".5:8b_128g/.5:6b_128g"),
    (".75:8b_128g/.25:6b_128g", ".75:8b_128g/.25:6b_128g"),
]


def attn_candidates(extended: bool = True) -> list[dict[str, QParams]]:
    rows = [dict(r) for r in QPARAMS_ATTN]
    if extended:
        rows += [dict.fromkeys(ATTN_KEYS, parse_recipe(r)) for r in _EXTRA_ATTN]
    return rows


def moe_candidates(extended: bool = True) -> list[dict[str, QParams]]:
    rows = [dict(r) for r in QPARAMS_MLP]
    if extended:
        rows += [{"w1": parse_recipe(a), "w3": parse_recipe(a), "w2": parse_recipe(b)} for a, b in _EXTRA_MOE]
    return rows
