"""The Mixtral architectures mixq knows by name, at their published shapes (`mixq synth`, the planner, bench)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from mixq.errors import MixqError
from mixq.model.config import MixtralConfig

ARCHS: dict[str, MixtralConfig] = {
    "mixtral-8x7b": MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
        max_position_embeddings=32768,
    ),
    "mixtral-8x22b": MixtralConfig(
        vocab_size=32768,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
        max_position_embeddings=65536,
    ),
}


def arch_config(arch: str, layers: int | None = None) -> MixtralConfig:
    """A preset name (`mixtral-8x7b`, `mixtral-8x22b`) or a config.json path; `layers` overrides the depth."""
    if arch in ARCHS:
        cfg = replace(ARCHS[arch])
    elif os.path.isfile(arch):
        try:
            with open(arch, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise MixqError(f"{arch}: cannot read config ({e})") from None
        cfg = MixtralConfig.from_dict(d, source=arch)
    else:
        raise MixqError(f"--arch {arch}: not a preset ({', '.join(ARCHS)}) nor a config.json file")
    if layers is not None:
        if layers < 1:
            raise MixqError(f"--layers {layers}: must be at least 1")
        cfg = replace(cfg, num_hidden_layers=layers)
    cfg = replace(cfg, raw={})
    check_exl2_shapes(cfg, arch)
    return cfg


def check_exl2_shapes(cfg: MixtralConfig, source: str) -> None:
    """The one shape rule for EXL2 Mixtrals, shared by `mixq convert` and `mixq synth` (docs: exl2-format.md 3.5).

    The input width K of every quantized matrix must be a multiple of 32 (packed rows of 32 bits, the GEMM's 32-row
    steps): hidden_size (q/k/v, w1/w3, lm_head), intermediate_size (w2), heads x head_dim (o_proj). Output widths
    are padded to a multiple of 32 in storage, as exllamav2 does, so vocab_size may be anything (lm_head is stored
    padded). The k/v projections are kept unpadded, their outputs being split into heads, so key/value heads x
    head_dim must be a multiple of 32 too (every published Mixtral's is).
    """
    dims = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads*head_dim": cfg.q_size,
        "num_key_value_heads*head_dim": cfg.kv_size,
    }
    for name, d in dims.items():
        if d % 32:
            raise MixqError(f"{source}: {name} = {d} is not a multiple of 32, which EXL2 layers require")


def arch_name(cfg: MixtralConfig) -> str:
    """`mixtral-8x7b` / `mixtral-8x22b` when the shapes match a preset (any depth), else `custom`."""
    for name, p in ARCHS.items():
        if (p.hidden_size, p.intermediate_size, p.num_local_experts, p.num_attention_heads) == (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_local_experts,
            cfg.num_attention_heads,
        ):
            return name
    return "custom"
