"""Quantization recipes (exllamav2's `QParams`), their group layout and their exact bit cost.

A recipe splits the `K` input rows of a matrix (in act-order) into runs of decreasing bit width: the first
`bits_prop[0]` fraction of rows at `bits[0]` with groups of `group_size[bits[0]]` rows, and so on. The group
count and the bit total follow exllamav2's converter formula exactly (float `K * p`, `ceil`, a running
remainder), so that "4.0 bpw" means the same thing in both projects.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mixq.errors import FormatError

BIT_WIDTHS = (8, 6, 5, 4, 3, 2)


@dataclass
class QParams:
    bits: list[int]
    bits_prop: list[float]
    group_size: dict[int, int] = field(default_factory=dict)
    scale_bits: int = 4

    def __post_init__(self) -> None:
        self.group_size = {int(b): int(g) for b, g in self.group_size.items()}
        if not self.bits or len(self.bits) != len(self.bits_prop):
            raise FormatError(f"recipe {self.bits}/{self.bits_prop}: need one fraction per bit width")
        if any(b not in BIT_WIDTHS for b in self.bits):
            raise FormatError(f"recipe {self.desc}: bit widths must be among {BIT_WIDTHS}")
        if list(self.bits) != sorted(self.bits, reverse=True) or len(set(self.bits)) != len(self.bits):
            raise FormatError(f"recipe {self.desc}: bit widths must be distinct and listed from high to low")
        if any(b not in self.group_size for b in self.bits):
            raise FormatError(f"recipe {self.desc}: every bit width needs a group size")
        if any(self.group_size[b] < 32 or self.group_size[b] % 32 for b in self.bits):
            raise FormatError(f"recipe {self.desc}: group sizes must be multiples of 32")
        if abs(sum(self.bits_prop) - 1.0) > 1e-6 or any(p < 0 for p in self.bits_prop):
            raise FormatError(f"recipe {self.desc}: the row fractions must be non-negative and sum to 1")
        if self.scale_bits != 4:
            raise FormatError(f"recipe {self.desc}: only 4-bit scales exist in EXL2")

    @property
    def desc(self) -> str:
        """Compact notation, e.g. `0.05:8b_32g/0.95:4b_128g` (what `parse_recipe` reads)."""
        return "/".join(f"{p:g}:{b}b_{self.group_size.get(b, '?')}g" for b, p in zip(self.bits, self.bits_prop))

    def __str__(self) -> str:
        return self.desc

    def group_counts(self, K: int) -> list[int]:
        """Groups per listed bit width, exllamav2's formula (`qparams.py` `total_bits`)."""
        counts, remaining = [], K
        for b, p in zip(self.bits, self.bits_prop):
            gs = self.group_size[b]
            g = max(0, math.ceil(min(K * p, remaining) / gs))  # max(): only matters for degenerate tiny K
            counts.append(g)
            remaining -= g * gs
        if remaining > 0:  # cannot happen when the fractions sum to 1; kept as exllamav2's assert
            raise FormatError(f"recipe {self.desc}: leaves {remaining} of {K} rows without a group")
        return counts

    def groups(self, K: int) -> list[tuple[int, int]]:
        """(bits, rows) for every group in stored order; the group that reaches `K` is cut there."""
        if K <= 0 or K % 32:
            raise FormatError(f"recipe {self.desc}: K={K} must be a positive multiple of 32")
        out, left = [], K
        for b, g in zip(self.bits, self.group_counts(K)):
            for _ in range(g):
                r = min(self.group_size[b], left)
                if r > 0:
                    out.append((b, r))
                left -= r
        return out

    def total_bits(self, K: int, N: int, bias: bool = False) -> int:
        """Bits of one K x N matrix with all EXL2 metadata, as exllamav2 counts them (section 5.3)."""
        counts = self.group_counts(K)
        G = sum(counts)
        total, left = 0, K
        for b, g in zip(self.bits, counts):
            r = min(self.group_size[b] * g, left)
            left -= r
            total += r * N * b  # q_weight
        total += 16 * G  # q_scale_max
        total += 32 * G  # q_groups (two int16 per group)
        total += self.scale_bits * G * N  # q_scale
        total += 32 * K  # q_invperm
        if bias:
            total += 16 * N
        return total

    def bpw(self, K: int, N: int, bias: bool = False) -> float:
        return self.total_bits(K, N, bias) / (K * N + (N if bias else 0))

    def to_dict(self) -> dict:
        """measurement.json form; `json.dumps` turns the group_size keys into strings as exllamav2's does."""
        return {
            "group_size": {b: self.group_size[b] for b in self.bits},
            "bits": list(self.bits),
            "bits_prop": list(self.bits_prop),
            "scale_bits": self.scale_bits,
        }

    @staticmethod
    def from_dict(d: dict) -> QParams:
        try:
            gs = d["group_size"]
            bits = [int(b) for b in d["bits"]]
            if not isinstance(gs, dict):  # exllamav2 also accepts one size for all widths
                gs = {b: gs for b in bits}
            return QParams(bits, [float(p) for p in d["bits_prop"]], gs, int(d.get("scale_bits", 4)))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise FormatError(
                f"quantization recipe {d!r}: malformed ({e}); expected bits, bits_prop, group_size"
            ) from e


_TERM = re.compile(r"^(?:([0-9]*\.?[0-9]+):)?([0-9]+)b_([0-9]+)g$")


def parse_recipe(s: str) -> QParams:
    """`0.05:8b_32g/0.1:4b_128g/0.85:3b_128g` -> QParams; a lone `4b_128g` means all rows."""
    bits, props, gs = [], [], {}
    for term in s.replace(" ", "").split("/"):
        m = _TERM.match(term)
        if not m:
            raise FormatError(f"recipe {s!r}: cannot read {term!r}; write terms like 0.1:4b_128g joined by /")
        p, b, g = m.groups()
        bits.append(int(b))
        props.append(float(p) if p is not None else 1.0)
        gs[int(b)] = int(g)
    return QParams(bits, props, gs)


def _rows(table: list[str], names: tuple[str, ...]) -> list[dict[str, QParams]]:
    return [dict(zip(names, (parse_recipe(r) for r in row.split()))) for row in table]


# exllamav2's `qparams_attn` (section 5.4): q_proj k_proj v_proj o_proj per row, lowest bpw first.
_ATTN = [
    "0.05:3b_64g/0.95:2b_64g 0.05:3b_64g/0.95:2b_64g 0.05:3b_64g/0.95:2b_64g 0.05:3b_64g/0.95:2b_64g",
    "0.1:3b_64g/0.9:2b_64g 0.1:3b_64g/0.9:2b_64g 0.25:3b_64g/0.75:2b_64g 0.1:3b_64g/0.9:2b_64g",
    "0.1:3b_64g/0.9:2b_64g 0.1:3b_64g/0.9:2b_64g 0.1:4b_128g/0.9:3b_128g 0.1:3b_64g/0.9:2b_64g",
    "0.1:3b_64g/0.9:2b_64g 0.1:3b_64g/0.9:2b_64g 0.1:4b_128g/0.9:3b_128g 0.1:4b_128g/0.9:3b_128g",
    "0.1:4b_128g/0.9:3b_128g 0.1:4b_128g/0.9:3b_128g 0.1:4b_128g/0.9:3b_128g 0.1:4b_128g/0.9:3b_128g",
    "0.1:4b_128g/0.9:3b_128g 0.1:4b_128g/0.9:3b_128g 0.1:4b_64g/0.9:3b_64g 0.1:4b_128g/0.9:3b_128g",
    "4b_128g 4b_128g 4b_128g 4b_128g",
    "4b_128g 4b_128g 4b_64g 4b_128g",
    "4b_64g 4b_64g 4b_32g 4b_64g",
    "4b_32g 4b_32g 4b_32g 4b_32g",
    "0.1:5b_128g/0.9:4b_128g 0.1:5b_128g/0.9:4b_128g 0.1:5b_64g/0.9:4b_64g 0.1:5b_128g/0.9:4b_128g",
    "0.1:5b_64g/0.9:4b_64g 0.1:5b_64g/0.9:4b_64g 0.1:5b_32g/0.9:4b_32g 0.1:5b_64g/0.9:4b_64g",
    "0.1:5b_64g/0.9:4b_64g 0.1:5b_64g/0.9:4b_64g 5b_64g 0.1:5b_64g/0.9:4b_64g",
    "0.1:5b_32g/0.9:4b_32g 0.1:5b_32g/0.9:4b_32g 5b_32g 0.1:5b_32g/0.9:4b_32g",
    "0.1:6b_128g/0.9:5b_128g 0.1:6b_128g/0.9:5b_128g 6b_128g 0.1:6b_128g/0.9:5b_128g",
    "0.1:6b_32g/0.9:5b_32g 0.1:6b_32g/0.9:5b_32g 6b_32g 0.1:6b_32g/0.9:5b_32g",
    "6b_128g 6b_128g 6b_128g 6b_128g",
    "6b_32g 6b_32g 8b_32g 6b_32g",
    "8b_128g 8b_128g 8b_128g 8b_128g",
]

# exllamav2's `qparams_mlp` (section 5.4): w1 (gate) w3 (up) w2 (down) per row.
_MLP = [
    "0.05:3b_64g/0.95:2b_64g 0.05:3b_64g/0.95:2b_64g 0.05:6b_32g/0.2:3b_64g/0.75:2b_64g",
    "0.1:3b_64g/0.9:2b_64g 0.25:3b_64g/0.75:2b_64g 0.05:6b_32g/0.2:3b_64g/0.75:2b_64g",
    "0.1:3b_64g/0.9:2b_64g 0.3:3b_64g/0.7:2b_64g 0.05:5b_32g/0.95:3b_32g",
    "0.1:3b_64g/0.9:2b_64g 0.3:3b_64g/0.7:2b_64g 0.05:5b_32g/0.95:4b_32g",
    "0.1:4b_128g/0.9:3b_128g 0.25:4b_128g/0.75:3b_128g 0.05:8b_32g/0.1:4b_128g/0.85:3b_128g",
    "0.1:4b_32g/0.9:3b_32g 0.25:4b_32g/0.75:3b_32g 0.05:8b_32g/0.1:4b_32g/0.85:3b_32g",
    "0.1:4b_32g/0.9:3b_32g 0.25:4b_32g/0.75:3b_32g 0.05:8b_32g/0.95:4b_128g",
    "4b_128g 4b_32g 0.05:8b_32g/0.95:4b_128g",
    "4b_32g 4b_32g 0.05:8b_32g/0.95:4b_32g",
    "0.1:5b_128g/0.9:4b_128g 0.25:5b_128g/0.75:4b_128g 0.05:8b_32g/0.1:5b_128g/0.85:4b_128g",
    "0.1:5b_32g/0.9:4b_32g 0.25:5b_32g/0.75:4b_32g 0.05:8b_32g/0.1:5b_32g/0.85:4b_32g",
    "0.1:6b_128g/0.9:5b_128g 0.25:6b_128g/0.75:5b_128g 0.05:8b_32g/0.1:6b_128g/0.85:5b_128g",
    "0.1:6b_32g/0.9:5b_32g 0.25:6b_32g/0.75:5b_32g 0.05:8b_32g/0.1:6b_32g/0.85:5b_32g",
    "6b_128g 6b_128g 0.05:8b_32g/0.95:6b_128g",
    "0.1:8b_128g/0.9:6b_128g 0.1:8b_128g/0.9:6b_128g 0.15:8b_128g/0.85:6b_128g",
    "0.1:8b_128g/0.9:6b_128g 0.1:8b_128g/0.9:6b_128g 8b_128g",
    "8b_128g 8b_128g 8b_128g",
]

QPARAMS_ATTN: list[dict[str, QParams]] = _rows(_ATTN, ("q_proj", "k_proj", "v_proj", "o_proj"))
QPARAMS_MLP: list[dict[str, QParams]] = _rows(_MLP, ("w1", "w3", "w2"))

# exllamav2's `qparams_headoptions` (`-hb`): lm_head recipe per nominal head bits; 6 is the default.
QPARAMS_HEAD: dict[int, QParams] = {
    2: parse_recipe("0.3:4b_32g/0.7:2b_32g"),
    3: parse_recipe("0.15:4b_32g/0.85:3b_32g"),
    4: parse_recipe("0.15:6b_32g/0.85:4b_32g"),
    5: parse_recipe("0.15:6b_128g/0.85:5b_128g"),
    6: parse_recipe("0.15:8b_128g/0.85:6b_128g"),
    8: parse_recipe("8b_128g"),
}
