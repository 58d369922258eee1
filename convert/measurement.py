"""Which model a measurement.json measured, and refusing one taken from another model.

mixq writes a `model` entry beside exllamav2's keys: the shapes that decide every candidate's bit cost, a
hash of config.json's architecture fields and a hash of the tensor index (every name, dtype and shape). A
measurement without it (exllamav2's, or an older mixq's) is checked by recomputing each candidate's bit
total from its recipe: a model of other shapes gives other totals.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from mixq.errors import FormatError, MixqError
from mixq.exl2.qparams import QParams
from mixq.model.checkpoint import TensorIndex
from mixq.model.config import MixtralConfig

_SHAPE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_local_experts",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_identity(cfg: MixtralConfig, index: TensorIndex) -> dict:
    tensors = {k: [index.dtype(k), index.shape(k)] for k in sorted(index.keys())}
    return {
        **{f: getattr(cfg, f) for f in _SHAPE_FIELDS},
        "config_sha256": _sha256({k: v for k, v in cfg.to_dict().items() if k != "torch_dtype"}),
        "tensors_sha256": _sha256(tensors),
    }


def _check_identity(path: str, theirs: dict, ours: dict) -> None:
    if not isinstance(theirs, dict):
        raise MixqError(f"{path}: its 'model' entry is not an object; the file is damaged, measure again")
    diff = [f"{f} {theirs.get(f)} (this model: {ours[f]})" for f in _SHAPE_FIELDS if theirs.get(f) != ours[f]]
    if diff:
        raise MixqError(f"{path}: measured another model: {', '.join(diff)}; drop --measurement to measure this one")
    for key, what in (("config_sha256", "config.json"), ("tensors_sha256", "tensor names, dtypes and shapes")):
        if theirs.get(key) != ours[key]:
            raise MixqError(
                f"{path}: measured another model (its {what} differ from this one's); "
                "drop --measurement to measure this one"
            )


def load_measurement(
    path: str, cfg: MixtralConfig, identity: dict, block_bits: Callable[[dict[str, QParams]], int]
) -> dict:
    """The measurement at `path` if it measured this model; MixqError (one line) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("measurement"), dict):
            raise ValueError("no 'measurement' object")
        m = data["measurement"]
        for i in range(cfg.num_hidden_layers):
            for b in ("self_attn", "block_sparse_moe"):
                if not m.get(f"model.layers.{i}.{b}"):
                    raise KeyError(f"model.layers.{i}.{b}")
    except (OSError, ValueError) as e:
        raise MixqError(f"{path}: cannot read measurement ({e})") from None
    except KeyError as e:
        raise MixqError(f"{path}: measurement has no entry {e.args[0]}; it belongs to another model") from None
    if "model" in data:
        _check_identity(path, data["model"], identity)
    keys = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "block_sparse_moe": ("w1", "w3", "w2")}
    for i in range(cfg.num_hidden_layers):
        for b, mats in keys.items():
            name = f"model.layers.{i}.{b}"
            for j, entry in enumerate(m[name]):
                try:
                    bits = block_bits({k: QParams.from_dict(entry[k]) for k in mats})
                    stored = int(entry["total_bits"])
                    float(entry["accuracy"])
                except (KeyError, TypeError, ValueError, OverflowError, AttributeError, FormatError) as e:
                    raise MixqError(f"{path}: {name} candidate {j} is not a valid entry ({e}); measure again") from None
                if bits != stored:
                    raise MixqError(
                        f"{path}: {name} candidate {j} costs {stored} bits there but {bits} on this model: it "
                        "measured a model of other shapes; drop --measurement to measure this one"
                    )
    return data
