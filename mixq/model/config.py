"""Mixtral architecture parameters, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from mixq.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
SUPPORTED_MODEL_TYPES = ("mixtral",)


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
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> MixtralConfig:
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"{source}: architecture {archs[0]!r} is not supported; mixq runs MixtralForCausalLM checkpoints"
            )
        if not archs and model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported; mixq runs Mixtral checkpoints"
            )
        try:
            rope_theta = d.get("rope_theta")
            rope_params = d.get("rope_parameters") or {}
            if rope_theta is None and isinstance(rope_params, dict):
                rope_theta = rope_params.get("rope_theta")
            rope_type = (rope_params or {}).get("rope_type", "default") if isinstance(rope_params, dict) else "default"
            scaling = d.get("rope_scaling")
            if rope_type not in (None, "default") or (scaling and scaling.get("rope_type", "default") != "default"):
                raise CheckpointError(f"{source}: RoPE scaling {rope_type or scaling!r} is not supported yet")
            eos = d.get("eos_token_id", 2)
            eos_list = [int(e) for e in (eos if isinstance(eos, list) else [eos])] if eos is not None else []
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                head_dim=int(d["head_dim"]) if d.get("head_dim") else None,
                num_local_experts=int(d.get("num_local_experts") or d.get("num_experts") or 8),
                num_experts_per_tok=int(d.get("num_experts_per_tok", 2)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta if rope_theta is not None else 1e6),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                sliding_window=int(d["sliding_window"]) if d.get("sliding_window") else None,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_list,
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),
                raw=dict(d),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid value ({e})") from None
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({cfg.num_key_value_heads})"
            )
        if not 1 <= cfg.num_experts_per_tok <= cfg.num_local_experts:
            raise CheckpointError(
                f"{source}: num_experts_per_tok ({cfg.num_experts_per_tok}) must be between 1 and "
                f"num_local_experts ({cfg.num_local_experts})"
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
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: cannot read config ({e})") from None
        return cls.from_dict(d, source=cfg_path)
