"""Property-based fuzzing of every parser of untrusted input: safetensors headers, config.json, tokenizer files,
EXL2 tensor sets, measurement.json. Every case is accepted or ends in mixq's own one-line error (a MixqError);
never another exception, never a hang (each example has a deadline)."""

import json
import os
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixq.convert.measurement import load_measurement, model_identity
from mixq.convert.pipeline import _block_bits
from mixq.errors import MixqError
from mixq.exl2.format import parse_exl2
from mixq.model.checkpoint import TensorIndex
from mixq.model.config import MixtralConfig
from mixq.model.tokenizer import load_tokenizer
from mixq.model.verify import check_shapes, scan_finite
from mixq.synthetic.hf_checkpoint import SAMPLE_TEXT, build_tokenizer, save_tokenizer

FUZZ = settings(
    max_examples=40, deadline=2000, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

TINY = dict(
    architectures=["MixtralForCausalLM"],
    model_type="mixtral",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_local_experts=2,
    num_experts_per_tok=1,
    max_position_embeddings=64,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _one_line(e: MixqError) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


# --- safetensors headers ------------------------------------------------------------------------------------

DTYPES = ["F16", "BF16", "F32", "F64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "I64", "X9", ""]
ints = st.integers(-3, 2**64 + 3) | st.integers(0, 300)


@st.composite
def tensor_entry(draw):
    entry = {
        "dtype": draw(st.sampled_from(DTYPES)),
        "shape": draw(st.lists(st.integers(-2, 40) | st.integers(0, 2**63), max_size=3)),
        "data_offsets": draw(st.lists(ints, min_size=2, max_size=2) | st.lists(ints, max_size=3)),
    }
    for k in draw(st.sets(st.sampled_from(list(entry)), max_size=1)):  # sometimes a field is missing or odd
        entry[k] = draw(json_values)
    return entry


KEYS = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"]


@st.composite
def safetensors_file(draw):
    kind = draw(st.sampled_from(["entries", "json", "bytes"]))
    if kind == "entries":
        header = {k: draw(tensor_entry()) for k in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=4))}
        if draw(st.booleans()):
            header["__metadata__"] = draw(json_values)
        raw = json.dumps(header).encode()
    elif kind == "json":
        raw = json.dumps(draw(json_values)).encode()
    else:
        raw = draw(st.binary(max_size=64))
    n = draw(st.sampled_from(["right", "right", "huge", "random"]))
    length = {"right": len(raw), "huge": 2**63 + 5, "random": draw(st.integers(0, 2**64 - 1))}[n]
    return struct.pack("<Q", length) + raw + draw(st.binary(max_size=600))


@FUZZ
@given(data=safetensors_file())
def test_safetensors_headers(data):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(data)
        try:
            index = TensorIndex(d)
            for k in list(index.keys()):
                index.shape(k), index.dtype(k)
                index.get(k)
                list(index.chunks(k))
            cfg = MixtralConfig.from_dict(TINY)
            check_shapes(index, cfg)
            scan_finite(index, cfg)
        except MixqError as e:
            _one_line(e)


# --- config.json ----------------------------------------------------------------------------------------------

FIELDS = list(TINY) + "head_dim rms_norm_eps rope_theta sliding_window tie_word_embeddings bos_token_id".split()
FIELDS += "eos_token_id rope_scaling rope_parameters torch_dtype num_experts".split()
absurd = st.sampled_from([0, -1, 2**31, 2**62, 10**30, 1.5, float("nan"), float("inf"), "32", "", [], {}, None, True])


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), absurd | json_values, max_size=4),
    drop=st.sets(st.sampled_from(FIELDS), max_size=2),
)
def test_config_fields(changes, drop):
    d = {k: v for k, v in {**TINY, **changes}.items() if k not in drop}
    try:
        cfg = MixtralConfig.from_dict(d)
    except MixqError as e:
        _one_line(e)
        return
    # Accepted: every size is positive and small enough that nothing sized by it is absurd.
    sizes = "vocab_size hidden_size intermediate_size num_hidden_layers head_dim num_attention_heads"
    for v in (
        getattr(cfg, f) for f in (sizes + " num_key_value_heads num_local_experts max_position_embeddings").split()
    ):
        assert isinstance(v, int) and 0 < v <= 2**24, cfg
    assert cfg.rms_norm_eps > 0 and cfg.rope_theta > 0


@FUZZ
@given(content=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_config_file(content):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "wb") as f:
            f.write(content)
        try:
            MixtralConfig.from_dir(d)
        except MixqError as e:
            _one_line(e)


# --- tokenizer files ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(str(d), build_tokenizer([SAMPLE_TEXT] * 2, 300), 300)
    return {f: (d / f).read_bytes() for f in os.listdir(d)}


def _mutate_json(draw, raw: bytes) -> bytes:
    """A valid file with a few values replaced, a field dropped, or cut short."""
    how = draw(st.sampled_from(["replace", "drop", "truncate", "garbage"]))
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw)))]
    if how == "garbage":
        return draw(st.binary(max_size=100))
    try:
        data = json.loads(raw)
    except ValueError:  # not a JSON file (chat_template.jinja): cut it instead
        return raw[: draw(st.integers(0, len(raw)))]
    if not isinstance(data, dict) or not data:
        return raw
    key = draw(st.sampled_from(sorted(data)))
    if how == "drop":
        del data[key]
    else:
        data[key] = draw(absurd | json_values)
        if isinstance(data.get("model"), dict) and draw(st.booleans()):
            sub = data["model"]
            if sub:
                sub[draw(st.sampled_from(sorted(sub)))] = draw(absurd | json_values)
    return json.dumps(data).encode()


@FUZZ
@given(data=st.data())
def test_tokenizer_files(tokenizer_files, data):
    names = sorted(tokenizer_files)
    broken = data.draw(st.sets(st.sampled_from(names + ["config.json"]), min_size=1, max_size=2))
    with tempfile.TemporaryDirectory() as d:
        files = {**tokenizer_files, "config.json": json.dumps(TINY | {"vocab_size": 320}).encode()}
        for name, raw in files.items():
            if name in broken:
                raw = _mutate_json(data.draw, raw) if data.draw(st.booleans()) else data.draw(st.binary(max_size=50))
            with open(os.path.join(d, name), "wb") as f:
                f.write(raw)
        try:
            tok = load_tokenizer(d)
            ids = tok.encode("Hello, world! " + SAMPLE_TEXT[:40])
            tok.decode(ids)
            tok.encode_chat([{"role": "user", "content": "hi"}])
        except MixqError as e:
            _one_line(e)


# --- EXL2 tensor sets -----------------------------------------------------------------------------------------

i16 = st.integers(-(2**15), 2**15 - 1)


@st.composite
def exl2_set(draw):
    """Near-valid sets: q_groups as (bits, start) pairs with random bits and starts; q_invperm nearly a permutation;
    sometimes a wrong dtype or rank."""
    n = draw(st.sampled_from([32, 64, 31, 0]))
    groups = draw(st.lists(st.tuples(st.sampled_from([8, 6, 5, 4, 3, 2, 7, 0, -4]), st.integers(0, 48)), min_size=0,
                           max_size=4))  # fmt: skip
    q_groups = [v for b, s in groups for v in (b, s)]
    if draw(st.booleans()):
        q_groups = draw(st.lists(i16, max_size=6))
    rows = draw(st.integers(0, 64))
    k = draw(st.integers(0, 200))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(torch.int32)
    if k and draw(st.booleans()):
        perm[draw(st.integers(0, k - 1))] = draw(st.integers(-(2**31), 2**31 - 1))
    g = max(len(q_groups) // 2, 1)
    t = {
        "q_weight": torch.zeros(rows, n, dtype=torch.int32),
        "q_invperm": perm,
        "q_scale": torch.zeros(draw(st.sampled_from([g, g + 1])), n // 8, dtype=torch.int32),
        "q_scale_max": torch.tensor([draw(st.floats(width=16))] * g, dtype=torch.float16),
        "q_groups": torch.tensor(q_groups, dtype=torch.int16),
    }
    for key in draw(st.sets(st.sampled_from(sorted(t)), max_size=1)):
        t[key] = t[key].to(draw(st.sampled_from([torch.int64, torch.float32, torch.int16]))).reshape(-1)
    if draw(st.booleans()):
        del t[draw(st.sampled_from(sorted(t)))]
    return t


@FUZZ
@given(tensors=exl2_set())
def test_exl2_tensor_sets(tensors):
    try:
        parsed = parse_exl2(tensors, "layer.q_proj")
    except MixqError as e:
        _one_line(e)
        return
    # Accepted: the groups tile q_weight exactly and the permutation covers every input row once.
    assert sum(g.rows * g.bits // 32 for g in parsed.groups) == parsed.q_weight.shape[0]
    assert sorted(parsed.q_invperm.tolist()) == list(range(parsed.in_features))


# --- measurement.json -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from test_convert_faults import _made_up_measurement

    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    d = tmp_path_factory.mktemp("m")
    cfg = MixtralConfig(**{k: v for k, v in TINY.items() if k not in ("architectures", "model_type")})
    write_random_checkpoint(str(d), cfg)
    _made_up_measurement(d, d / "measurement.json")
    return cfg, model_identity(cfg, TensorIndex(str(d))), (d / "measurement.json").read_bytes()


@FUZZ
@given(data=st.data())
def test_measurement_files(measured, data):
    cfg, identity, raw = measured
    doc = json.loads(raw)
    layer = doc["measurement"]["model.layers.0.block_sparse_moe"]
    entry = layer[data.draw(st.integers(0, len(layer) - 1))]
    target = data.draw(st.sampled_from(["entry", "recipe", "file", "model"]))
    if target == "entry":
        entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(absurd | json_values)
    elif target == "recipe":
        entry["w1"][data.draw(st.sampled_from(sorted(entry["w1"])))] = data.draw(absurd | json_values)
    elif target == "model":
        doc["model"] = {**identity, data.draw(st.sampled_from(sorted(identity))): data.draw(absurd | json_values)}
    raw2 = json.dumps(doc).encode() if target != "file" else _mutate_json(data.draw, raw)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "measurement.json")
        with open(path, "wb") as f:
            f.write(raw2)
        try:
            load_measurement(path, cfg, identity, lambda row: _block_bits(row, cfg))
        except MixqError as e:
            _one_line(e)
