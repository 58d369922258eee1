"""Recipes, group layout and bits accounting against the numbers of docs/exl2-format.md (sections 2.2, 5.3, 5.4)."""

import json
import random

import pytest

from mixq.errors import FormatError
from mixq.exl2.qparams import QPARAMS_ATTN, QPARAMS_HEAD, QPARAMS_MLP, QParams, parse_recipe

ATTN_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096)}
MLP_SHAPES = {"w1": (4096, 14336), "w3": (4096, 14336), "w2": (14336, 4096)}

# Block bpw printed in the spec's tables (3 decimals), rows 0..18 and 0..16.
SPEC_ATTN_BPW = [2.138, 2.199, 2.283, 2.677, 3.169, 3.171, 4.044, 4.047, 4.082, 4.138, 4.171, 4.190, 4.274, 4.330,
                 5.256, 5.330, 6.044, 6.338, 8.044]  # fmt: skip
SPEC_MLP_BPW = [2.245, 2.323, 2.596, 2.912, 3.283, 3.366, 3.619, 4.137, 4.198, 4.266, 4.348, 5.249, 5.331, 6.071,
                6.303, 6.869, 8.035]  # fmt: skip
SPEC_HEAD_BPW = {2: 2.74, 3: 3.28, 4: 4.44, 5: 5.19, 6: 6.34, 8: 8.03}


def block_bpw(row, shapes):
    return sum(qp.total_bits(*shapes[k]) for k, qp in row.items()) / sum(shapes[k][0] * shapes[k][1] for k in row)


def test_spec_example_w2_layout_and_bits_exact():
    qp = parse_recipe("0.05:8b_32g / 0.1:4b_128g / 0.85:3b_128g")
    groups = qp.groups(14336)
    assert len(groups) == 130
    assert groups[:23] == [(8, 32)] * 23 and groups[23:35] == [(4, 128)] * 12
    assert groups[35:] == [(3, 128)] * 94 + [(3, 32)]
    assert sum(r * b // 32 for b, r in groups) == 1507  # q_weight rows
    K, N, G = 14336, 4096, 130
    weights = (736 * 8 + 1536 * 4 + 12064 * 3) * N
    assert qp.total_bits(K, N) == weights + 16 * G + 32 * G + 4 * G * N + 32 * K
    assert qp.total_bits(K, N, bias=True) == qp.total_bits(K, N) + 16 * N


def test_candidate_tables_reproduce_spec_bpw():
    assert len(QPARAMS_ATTN) == 19 and len(QPARAMS_MLP) == 17
    for i, row in enumerate(QPARAMS_ATTN):
        assert set(row) == set(ATTN_SHAPES)
        assert block_bpw(row, ATTN_SHAPES) == pytest.approx(SPEC_ATTN_BPW[i], abs=0.0011), i
    for i, row in enumerate(QPARAMS_MLP):
        assert block_bpw(row, MLP_SHAPES) == pytest.approx(SPEC_MLP_BPW[i], abs=0.0011), i
    for h, qp in QPARAMS_HEAD.items():
        assert qp.bpw(4096, 32000) == pytest.approx(SPEC_HEAD_BPW[h], abs=0.006), h


def test_plain_4bit_g128_overhead_range():
    qp = parse_recipe("4b_128g")
    for K, N in [(4096, 4096), (14336, 4096), (4096, 1024)]:  # spec 5.3: "4.039-4.063"
        assert 4.039 <= qp.bpw(K, N) <= 4.063


def test_dict_roundtrip_through_json():
    rng = random.Random()
    for row in rng.sample(QPARAMS_MLP, 5) + rng.sample(QPARAMS_ATTN, 5):
        for qp in row.values():
            d = json.loads(json.dumps(qp.to_dict()))
            assert all(isinstance(k, str) for k in d["group_size"])
            back = QParams.from_dict(d)
            assert back == qp and back.groups(4096) == qp.groups(4096)
    assert QParams.from_dict({"group_size": 64, "bits": [3, 2], "bits_prop": [0.1, 0.9], "scale_bits": 4}) == (
        parse_recipe("0.1:3b_64g/0.9:2b_64g")
    )


def test_groups_cover_k_for_random_recipes():
    rng = random.Random()
    for _ in range(200):
        widths = sorted(rng.sample([8, 6, 5, 4, 3, 2], rng.randint(1, 3)), reverse=True)
        cuts = sorted(rng.random() for _ in widths[:-1])
        props = [b - a for a, b in zip([0.0] + cuts, cuts + [1.0])]
        qp = QParams(widths, props, {b: rng.choice([32, 64, 128]) for b in widths})
        K = 32 * rng.randint(1, 300)
        gb = qp.groups(K)
        assert sum(r for _, r in gb) == K
        assert all(r % 32 == 0 and 0 < r <= qp.group_size[b] for b, r in gb)
        assert [b for b, _ in gb] == sorted((b for b, _ in gb), reverse=True)
        N = 32 * rng.randint(1, 8)
        assert qp.total_bits(K, N) == sum(r * b for b, r in gb) * N + len(gb) * (48 + 4 * N) + 32 * K


@pytest.mark.parametrize(
    "text, msg",
    [
        ("0.5:4b_128g/0.5:5b_128g", "from high to low"),
        ("0.5:4b_100g/0.5:3b_128g", "multiples of 32"),
        ("0.5:4b_128g/0.4:3b_128g", "sum to 1"),
        ("7b_128g", "bit widths must be among"),
        ("4bits", "cannot read"),
    ],
)
def test_bad_recipes(text, msg):
    with pytest.raises(FormatError, match=msg):
        parse_recipe(text)
