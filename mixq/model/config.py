"""Mixtral architecture parameters, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from mixq.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
SUPPORTED_MODEL_TYPES = ("mixtral",)

# Bounds far above any Mixtral (8x22B: hidden 6144, 56 layers, vocab 32768, 64k context) that keep every
# buffer sized from config.json sane; a config past them is damaged or not a Mixtral.
MAX_VOCAB = 1 << 24
MAX_WIDTH = 1 << 17
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_EXPERTS = 4096
MAX_POSITIONS = 1 << 24


@dataclass
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    torch_dtype: str | None = None
    # The raw json (kept so a converter can copy it with additions).
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "config.json") -> MixtralConfig:
        """Every field typed and bounded (config.json is untrusted input): one CheckpointError line otherwise."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object; restore config.json from the original model")
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(f"{source}: 'architectures' must be a list of class names, not {archs!r:.40}")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"{source}: architecture {archs[0]!r} is not supported; mixq runs MixtralForCausalLM checkpoints"
            )
        if not archs and model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r:.40} is not supported; mixq runs Mixtral checkpoints"
            )
        f = _Fields(d, source)
        rope_params = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        if not isinstance(rope_params, dict) or not isinstance(scaling, dict | None):
            raise CheckpointError(f"{source}: 'rope_parameters' and 'rope_scaling' must be objects")
        rope_type = rope_params.get("rope_type", "default")
        if rope_type not in (None, "default") or (scaling and scaling.get("rope_type", "default") != "default"):
            raise CheckpointError(f"{source}: RoPE scaling {rope_type or scaling!r:.60} is not supported yet")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta")
        heads = f.integer("num_attention_heads", hi=MAX_HEADS)
        kv = f.integer("num_key_value_heads", d.get("num_key_value_heads") or heads, hi=MAX_HEADS)
        n_experts = d.get("num_local_experts") or d.get("num_experts") or 8
        experts = f.integer("num_local_experts", n_experts, hi=MAX_EXPERTS)
        hidden = f.integer("hidden_size", hi=MAX_WIDTH)
        head_dim = f.integer("head_dim", hi=MAX_HEAD_DIM) if d.get("head_dim") else hidden // heads
        eos = d.get("eos_token_id", 2)
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        window = d.get("sliding_window")
        cfg = cls(
            vocab_size=f.integer("vocab_size", hi=MAX_VOCAB),
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size", hi=MAX_WIDTH * 8),
            num_hidden_layers=f.integer("num_hidden_layers", hi=MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            num_local_experts=experts,
            num_experts_per_tok=f.integer("num_experts_per_tok", d.get("num_experts_per_tok", 2), hi=experts),
            rms_norm_eps=f.number("rms_norm_eps", d.get("rms_norm_eps", 1e-5), hi=1.0),
            rope_theta=f.number("rope_theta", 1e6 if rope_theta is None else rope_theta, hi=1e12),
            max_position_embeddings=f.integer(
                "max_position_embeddings", d.get("max_position_embeddings", 32768), hi=MAX_POSITIONS
            ),
            sliding_window=f.integer("sliding_window", window, hi=2**31) if window else None,
            tie_word_embeddings=f.flag("tie_word_embeddings", d.get("tie_word_embeddings", False)),
            bos_token_id=None if d.get("bos_token_id") is None else f.integer("bos_token_id", lo=0, hi=2**31),
            eos_token_id=[f.integer("eos_token_id", e, lo=0, hi=2**31) for e in eos_list],
            torch_dtype=f.text("torch_dtype", d.get("torch_dtype") or d.get("dtype")),
            raw=dict(d),
        )
        if head_dim < 2 or head_dim % 2:
            raise CheckpointError(f"{source}: head_dim {head_dim} must be even and at least 2 (RoPE rotates pairs)")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({cfg.num_key_value_heads})"
            )
        return cfg

    @classmethod
    def from_dir(cls, path: str) -> MixtralConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such model directory")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{cfg_path}: config.json is missing; is this a Hugging Face model directory?")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: cannot read config ({e})") from None
        return cls.from_dict(d, source=cfg_path)


class _Fields:
    """Typed reads of config.json values; each error names the field and what it must be."""

    def __init__(self, d: dict[str, Any], source: str):
        self.d, self.source = d, source

    def _value(self, name: str, value: Any) -> Any:
        if value is _REQUIRED:
            if name not in self.d or self.d[name] is None:
                raise CheckpointError(f"{self.source}: required field {name!r} is missing")
            return self.d[name]
        return value

    def integer(self, name: str, value: Any = None, lo: int = 1, hi: int = 2**31) -> int:
        value = self._value(name, _REQUIRED if value is None else value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise CheckpointError(f"{self.source}: {name} is {value!r:.40}; it must be an integer from {lo} to {hi}")
        return value

    def number(self, name: str, value: Any, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= hi:
            raise CheckpointError(f"{self.source}: {name} is {value!r:.40}; it must be a number in (0, {hi:g}]")
        return float(value)

    def flag(self, name: str, value: Any) -> bool:
        if value not in (True, False, 0, 1):
            raise CheckpointError(f"{self.source}: {name} is {value!r:.40}; it must be true or false")
        return bool(value)

    def text(self, name: str, value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{self.source}: {name} is {value!r:.40}; it must be a string")
        return value


_REQUIRED = object()
