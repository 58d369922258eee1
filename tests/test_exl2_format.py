"""parse_exl2 validation, reference dequantization (fp16 arithmetic, permutation), Exl2Linear."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixq.errors import FormatError
from mixq.exl2 import dequantize, exl2_matmul_ref, parse_exl2, parse_recipe
from mixq.exl2.pack import make_q_groups, pack_q_weight, pack_scales
from mixq.model.exl2_linear import Exl2Linear
from mixq.synthetic.exl2_layer import random_exl2

NAME = "model.layers.0.self_attn.q_proj"


def layer(K=256, N=64, recipe="0.1:8b_32g/0.3:4b_64g/0.6:3b_128g", bias=False):
    return random_exl2(K, N, parse_recipe(recipe), bias=bias)


def tensors(t):
    return {k.split(".")[-1]: v.clone() for k, v in t.to_dict("x").items()}


def test_properties_of_a_parsed_layer():
    t = parse_exl2(tensors(layer()), NAME, out_features=64, in_features=256)
    assert (t.in_features, t.out_features) == (256, 64)
    assert [(g.bits, g.rows) for g in t.groups] == parse_recipe("0.1:8b_32g/0.3:4b_64g/0.6:3b_128g").groups(256)
    assert t.rows_per_bits == {8: (0, 32), 4: (32, 160), 3: (160, 256)}
    assert [g.qrow_start for g in t.groups] == t.q_groups[1::2].tolist()
    assert torch.equal(t.q_perm[t.q_invperm.long()], torch.arange(256))
    assert t.bits_per_weight() == parse_recipe("0.1:8b_32g/0.3:4b_64g/0.6:3b_128g").bpw(256, 64)


def test_write_read_file_roundtrip(tmp_path):
    t = layer(bias=True)
    save_file(t.to_dict(NAME), str(tmp_path / "a.safetensors"))
    back = load_file(str(tmp_path / "a.safetensors"))
    assert set(back) == {f"{NAME}.{k}" for k in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "bias")}
    t2 = parse_exl2({k[len(NAME) + 1 :]: v for k, v in back.items()}, NAME)
    assert torch.equal(dequantize(t2), dequantize(t))


def np_scale(code, smax):
    """The spec's half-precision scale, in numpy float16 (an implementation independent of torch)."""
    s256 = np.float16(np.float32(np.float16(smax)) / np.float32(256))
    return np.float16(np.float32(np.float16((code + 1) ** 2)) * np.float32(s256))


@pytest.mark.parametrize("smax", [0.5, 0.013, 3.1e-3])  # the last two make smax/256 an fp16 subnormal
def test_dequantize_hand_values(smax):
    # one 32-row 4-bit group (rows 0..31) then one 32-row 2-bit group; N = 32
    K, N = 64, 32
    q = torch.zeros(K, N, dtype=torch.int32)
    q[:32] = torch.randint(0, 16, (32, N))
    q[32:] = torch.randint(0, 4, (32, N))
    codes = torch.randint(0, 16, (2, N))
    gb = [(4, 32), (2, 32)]
    inv = torch.randperm(K).int()
    tens = dict(
        q_weight=pack_q_weight(q, gb),
        q_invperm=inv,
        q_scale=pack_scales(codes),
        q_scale_max=torch.tensor([smax, smax * 2], dtype=torch.float16),
        q_groups=make_q_groups(gb),
    )
    W = dequantize(parse_exl2(tens, NAME))
    assert W.dtype == torch.float16 and W.shape == (K, N)
    perm = torch.argsort(inv.long())
    for k in range(K):  # stored row k lands in original row perm[k]
        g, zero, m = (0, 8, smax) if k < 32 else (1, 2, smax * 2)
        for n in range(0, N, 7):
            s = np_scale(int(codes[g, n]), m)
            expect = np.float16(np.float32(int(q[k, n]) - zero) * np.float32(s))
            assert W[perm[k], n].item() == float(expect), (k, n)
    if smax == 0.5:  # one fully hand-computed value: code 3 -> 16 * 0.5/256 = 1/32; q = 10 -> 2/32
        tens["q_weight"] = pack_q_weight(torch.full((K, N), 10).where(torch.arange(K)[:, None] < 32, 2), gb)
        tens["q_scale"] = pack_scales(torch.full((2, N), 3))
        W = dequantize(parse_exl2(tens, NAME), torch.float32)
        assert W[perm[0], 0].item() == 0.0625 and W[perm[40], 5].item() == 0.0


def test_matmul_ref_and_linear(tmp_path):
    t = layer(bias=True)
    x = torch.randn(5, 3, 256)
    W = dequantize(t, torch.float64)
    expect = (x.double() @ W + t.bias.double()).float()
    y = exl2_matmul_ref(x, t)
    assert y.shape == (5, 3, 64) and torch.allclose(y, expect, rtol=1e-5, atol=1e-6)
    lin = Exl2Linear.from_tensors(tensors(t), NAME)
    assert (lin.in_features, lin.out_features) == (256, 64)
    assert torch.allclose(lin(x), expect, rtol=1e-5, atol=1e-6)
    assert lin.bits_per_weight() == t.bits_per_weight()
    assert set(dict(lin.named_buffers())) >= {"q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "bias"}
    lin.to(torch.device("meta"))  # moving drops the cached dense copy and moves every tensor
    assert lin._cache is None and lin.q_weight.device.type == "meta" and lin.exl2.q_scale.device.type == "meta"


def _bad(mutate):
    t = tensors(layer(bias=True))
    mutate(t)
    return t


def _set(key, value):
    return lambda t: t.__setitem__(key, value(t))


def _reorder_groups(t):
    # groups 0: 8-bit (32 rows = 8 words), then 4-bit groups; make group 1 a 3-bit group before a 4-bit one
    g = t["q_groups"].clone()
    g[2] = 3
    t["q_groups"] = g


BAD = {
    "missing": (lambda t: t.pop("q_scale"), "q_scale: missing"),
    "weight dtype": (_set("q_weight", lambda t: t["q_weight"].long()), "q_weight: dtype torch.int64"),
    "invperm dtype": (_set("q_invperm", lambda t: t["q_invperm"].long()), "q_invperm: dtype torch.int64"),
    "scale dtype": (_set("q_scale", lambda t: t["q_scale"].long()), "q_scale: dtype"),
    "scale_max dtype": (_set("q_scale_max", lambda t: t["q_scale_max"].float()), "q_scale_max: dtype torch.float32"),
    "groups dtype": (_set("q_groups", lambda t: t["q_groups"].int()), "q_groups: dtype torch.int32"),
    "weight 1-D": (_set("q_weight", lambda t: t["q_weight"].flatten()), "q_weight: shape .* 2-D"),
    "order": (_reorder_groups, "group 2 has 4 bits after a 3-bit group; EXL2 kernels need groups ordered by non-inc"),
    "bits 7": (_set("q_groups", lambda t: t["q_groups"].index_fill(0, torch.tensor([0]), 7)), "group 0 has 7 bits"),
    "size 48": (
        _set("q_groups", lambda t: torch.tensor([4, 0, 4, 6], dtype=torch.int16)),
        "group 0 has 48 rows; EXL2 kernels need group sizes that are multiples of 32",
    ),
    "partial rows": (
        _set("q_groups", lambda t: torch.tensor([8, 0, 3, 8], dtype=torch.int16)),
        "group 1 has .* packed words, not a whole number of 3-bit rows",
    ),
    "first start": (_set("q_groups", lambda t: t["q_groups"].index_fill(0, torch.tensor([1]), 2)), "group 0 starts"),
    "start past end": (
        _set("q_groups", lambda t: t["q_groups"].index_fill(0, torch.tensor([t["q_groups"].numel() - 1]), 30000)),
        "start offsets must increase",
    ),
    "odd groups": (_set("q_groups", lambda t: t["q_groups"][:-1]), "q_groups: has .* elements"),
    "width 48": (
        _set("q_weight", lambda t: t["q_weight"][:, :48]),
        "q_weight: width 48 is not a positive multiple of 32",
    ),
    "q_weight rows": (_set("q_weight", lambda t: t["q_weight"][:-1]), "q_groups|q_weight"),
    "q_scale shape": (_set("q_scale", lambda t: t["q_scale"][:, :4]), "q_scale: shape \\[.*, 4\\] but"),
    "q_scale_max len": (_set("q_scale_max", lambda t: t["q_scale_max"][:-1]), "q_scale_max: shape"),
    "q_scale_max nan": (
        _set("q_scale_max", lambda t: t["q_scale_max"].index_fill(0, torch.tensor([0]), float("nan"))),
        "q_scale_max: 1 of [0-9]+ values are NaN or inf",
    ),
    "invperm len": (_set("q_invperm", lambda t: t["q_invperm"][:-32]), "q_invperm: length 224 but .* K=256"),
    "invperm dup": (
        _set("q_invperm", lambda t: t["q_invperm"].index_fill(0, torch.tensor([1]), int(t["q_invperm"][0]))),
        "q_invperm: is not a permutation",
    ),
    "invperm range": (_set("q_invperm", lambda t: t["q_invperm"] + 1), "q_invperm: is not a permutation"),
    "bias shape": (_set("bias", lambda t: t["bias"][:32]), "bias: .* float vector of 64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_tensor_gives_one_line_error(case):
    mutate, msg = BAD[case]
    with pytest.raises(FormatError, match=msg) as e:
        parse_exl2(_bad(mutate), NAME)
    text = str(e.value)
    assert "\n" not in text and text.startswith(NAME + ".")


def test_shape_against_model():
    t = tensors(layer())
    with pytest.raises(FormatError, match="expects 512"):
        parse_exl2(t, NAME, in_features=512)
    with pytest.raises(FormatError, match="outputs pad"):
        parse_exl2(t, NAME, out_features=96)
    assert parse_exl2(t, NAME, out_features=50).out_features == 64  # 50 pads to 64
