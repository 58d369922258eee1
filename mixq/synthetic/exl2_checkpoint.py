"""Synthetic EXL2 checkpoints at real Mixtral shapes: random codes, a realistic recipe mix, no GPTQ.

For memory planning, kernels and benchmarks at full size without a 90 GB download and a day of conversion.
Per layer, one attention row and one MoE row of the converter's candidate tables are chosen with the
converter's knapsack (`mixq.convert.optimize.solve`) under the target bit budget, using the synthetic error
model err = 2^-bpw per block (errors shrink by half per extra bit, as measured EXL2 errors roughly do).
The budget counts the decoder layers only, as the converter does; the head follows `head_bits`.

Random layers are built straight from random packed words: every bit pattern of `q_weight` and `q_scale`
is a valid set of codes, so no packing is needed (`mixq.synthetic.exl2_layer.random_exl2` packs code by code and
takes seconds per expert matrix). Checkpoints stream to disk a shard at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

import torch

from mixq import __version__
from mixq.convert.candidates import attn_candidates, moe_candidates
from mixq.convert.optimize import Option, solve
from mixq.convert.writer import check_output_dir
from mixq.errors import MixqError
from mixq.exl2.format import Exl2Tensors
from mixq.exl2.pack import make_q_groups, packed_rows
from mixq.exl2.qparams import QPARAMS_HEAD, QParams
from mixq.model.archs import arch_name, check_exl2_shapes
from mixq.model.config import MixtralConfig
from mixq.model.exl2_linear import Exl2Linear
from mixq.model.loader import resolve_device, resolve_dtype
from mixq.model.mixtral import Attention, DecoderLayer, DenseLinear, Expert, Mixtral, MixtralModel, RMSNorm, SparseMoE
from mixq.model.shards import ShardWriter
from mixq.synthetic.hf_checkpoint import SAMPLE_TEXT, build_tokenizer, hf_config_dict, save_tokenizer

ATTN_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")
MOE_KEYS = ("w1", "w3", "w2")
# rms of ((c + 1) / 16)^2 over uniform 4-bit scale codes c: lets `std` set the weights' standard deviation.
_CODE_RMS = math.sqrt(sum((k / 16) ** 4 for k in range(1, 17)) / 16)


def random_linear(
    K: int, N: int, qp: QParams, generator: torch.Generator | None = None, std: float | None = None
) -> Exl2Tensors:
    """A valid random EXL2 layer `K x N` with uniform codes; weights' std about `std` (default 1/sqrt(K)).
    Stored `N` padded to a multiple of 32, as exllamav2 stores it (the padding columns are random too)."""
    std = K**-0.5 if std is None else std
    N = -(-N // 32) * 32
    dev = generator.device if generator is not None else torch.device("cpu")  # drawn where the generator lives
    gb = qp.groups(K)
    hi = 2**31
    q_weight = torch.randint(-hi, hi, (packed_rows(gb), N), dtype=torch.int32, generator=generator, device=dev)
    q_scale = torch.randint(-hi, hi, (len(gb), N // 8), dtype=torch.int32, generator=generator, device=dev)
    smax = torch.tensor([std * math.sqrt(3) / ((1 << (b - 1)) * _CODE_RMS) for b, _ in gb], device=dev)
    smax = smax * (0.75 + 0.5 * torch.rand(len(gb), generator=generator, device=dev))
    inv = torch.randperm(K, generator=generator, device=dev).to(torch.int32)
    return Exl2Tensors(q_weight, inv, q_scale, smax.half(), make_q_groups(gb, dev))


def block_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, int]]:
    """(K, N) of every linear of a decoder layer."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (H, cfg.q_size),
        "k_proj": (H, cfg.kv_size),
        "v_proj": (H, cfg.kv_size),
        "o_proj": (cfg.q_size, H),
        "w1": (H, I),
        "w3": (H, I),
        "w2": (I, H),
    }


def block_weights(cfg: MixtralConfig) -> tuple[int, int]:
    """Weights of one attention block and of one MoE block (all experts)."""
    s = block_shapes(cfg)
    return sum(k * n for k, n in (s[m] for m in ATTN_KEYS)), cfg.num_local_experts * sum(
        k * n for k, n in (s[m] for m in MOE_KEYS)
    )


def block_bits(cfg: MixtralConfig, row: dict[str, QParams]) -> int:
    s = block_shapes(cfg)
    experts = cfg.num_local_experts if "w1" in row else 1
    return experts * sum(qp.total_bits(*s[k]) for k, qp in row.items())


@dataclass
class Recipe:
    attn: list[dict[str, QParams]]  # per layer
    moe: list[dict[str, QParams]]
    attn_index: list[int]
    moe_index: list[int]
    bpw: float  # decoder average as the converter counts it


def choose_recipes(cfg: MixtralConfig, bits: float, extended: bool = True) -> Recipe:
    check_exl2_shapes(cfg, f"{arch_name(cfg)} config")  # the converter's rule
    ac, mc = attn_candidates(extended), moe_candidates(extended)
    ab, mb = [block_bits(cfg, r) for r in ac], [block_bits(cfg, r) for r in mc]
    wa, wm = block_weights(cfg)
    lo, hi = (min(ab) + min(mb)) / (wa + wm), (max(ab) + max(mb)) / (wa + wm)
    if not lo <= bits <= hi:
        raise MixqError(f"--bits {bits:g}: the candidate recipes reach {lo:.2f} to {hi:.2f} bpw; choose a target there")
    attn_opts = [Option(b, 2.0 ** -(b / wa)) for b in ab]
    moe_opts = [Option(b, 2.0 ** -(b / wm)) for b in mb]
    L = cfg.num_hidden_layers
    picks = solve([attn_opts, moe_opts] * L, int(L * (wa + wm) * bits))
    ai, mi = picks[0::2], picks[1::2]
    total = sum(ab[i] for i in ai) + sum(mb[i] for i in mi)
    return Recipe([ac[i] for i in ai], [mc[i] for i in mi], ai, mi, total / (L * (wa + wm)))


def _norm(n: int, g: torch.Generator) -> torch.Tensor:
    return 1 + 0.1 * torch.randn(n, generator=g)


def _layer_tensors(cfg: MixtralConfig, i: int, recipe: Recipe, g: torch.Generator) -> dict[str, torch.Tensor]:
    H, E, s = cfg.hidden_size, cfg.num_local_experts, block_shapes(cfg)
    p = f"model.layers.{i}"
    t = {
        f"{p}.input_layernorm.weight": _norm(H, g).half(),
        f"{p}.post_attention_layernorm.weight": _norm(H, g).half(),
        f"{p}.block_sparse_moe.gate.weight": (torch.randn(E, H, generator=g) * H**-0.5).half(),
    }
    for m in ATTN_KEYS:
        t.update(random_linear(*s[m], recipe.attn[i][m], g).to_dict(f"{p}.self_attn.{m}"))
    for e in range(E):
        for m in MOE_KEYS:
            t.update(random_linear(*s[m], recipe.moe[i][m], g).to_dict(f"{p}.block_sparse_moe.experts.{e}.{m}"))
    return t


def _head_exl2(cfg: MixtralConfig) -> bool:
    return not cfg.tie_word_embeddings  # any vocab size: the head is stored padded to 32 (check_exl2_shapes)


def synth_model(
    cfg: MixtralConfig,
    bits: float,
    device: str | torch.device = "cpu",
    *,
    head_bits: int = 6,
    seed: int = 0,
    dtype: torch.dtype | None = None,
):
    """A random EXL2 `Mixtral` built in memory (no disk), same recipe choice as `write_synthetic`. On a GPU the
    packed words are drawn there (an 8x7B in seconds; drawn on the CPU and copied, it takes minutes)."""

    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    _check_head_bits(head_bits)
    recipe = choose_recipes(cfg, bits)
    g = torch.Generator().manual_seed(seed)
    gq = torch.Generator(device=dev).manual_seed(seed) if dev.type == "cuda" else g
    H, s, eps = cfg.hidden_size, block_shapes(cfg), cfg.rms_norm_eps

    def lin(m: str, qp: QParams) -> Exl2Linear:
        return Exl2Linear(random_linear(*s[m], qp, gq), m).to(dev)

    layers = []
    for i in range(cfg.num_hidden_layers):
        a, m = recipe.attn[i], recipe.moe[i]
        attn = Attention(cfg, i, *(lin(k, a[k]) for k in ATTN_KEYS))
        gate = DenseLinear((torch.randn(cfg.num_local_experts, H, generator=g) * H**-0.5).to(dev, dtype))
        experts = [
            Expert(lin("w1", m["w1"]), lin("w2", m["w2"]), lin("w3", m["w3"])) for _ in range(cfg.num_local_experts)
        ]
        layers.append(
            DecoderLayer(
                RMSNorm(_norm(H, g).to(dev, dtype), eps),
                attn,
                RMSNorm(_norm(H, g).to(dev, dtype), eps),
                SparseMoE(cfg, gate, experts),
            )
        )
    embed = torch.randn(cfg.vocab_size, H, generator=g).to(dev, dtype)
    if _head_exl2(cfg):
        head = Exl2Linear(random_linear(H, cfg.vocab_size, QPARAMS_HEAD[head_bits], gq), "lm_head", cfg.vocab_size)
        head = head.to(dev)
    else:
        head = DenseLinear(
            embed if cfg.tie_word_embeddings else (torch.randn(cfg.vocab_size, H, generator=g) * H**-0.5).to(dev, dtype)
        )
    model = Mixtral(cfg, MixtralModel(embed, layers, RMSNorm(_norm(H, g).to(dev, dtype), eps)), head).eval()
    model.recipe = recipe
    return model


def _check_head_bits(head_bits: int) -> None:
    if head_bits not in QPARAMS_HEAD:
        raise MixqError(f"--head-bits {head_bits}: must be one of {', '.join(map(str, QPARAMS_HEAD))}")


def write_synthetic(
    out: str,
    cfg: MixtralConfig,
    bits: float,
    *,
    head_bits: int = 6,
    seed: int = 0,
    shard_mb: float = 2048,
    log=print,
) -> dict:
    """Write a complete random EXL2 checkpoint to `out` (built in `out.partial`, renamed at the end)."""

    _check_head_bits(head_bits)
    check_output_dir(out)
    recipe = choose_recipes(cfg, bits)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    g = torch.Generator().manual_seed(seed)
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    w = ShardWriter(tmp, "model", max(int(shard_mb * 2**20), 1))
    w.add({"model.embed_tokens.weight": torch.randn(cfg.vocab_size, H, generator=g).half()})
    decoder_bits = 0
    for i in range(L):
        t = _layer_tensors(cfg, i, recipe, g)
        decoder_bits += sum(v.numel() * v.element_size() * 8 for k, v in t.items() if ".q_" in k)
        w.add(t)
        log(f"layer {i + 1}/{L}: attn option {recipe.attn_index[i]}, moe option {recipe.moe_index[i]}")
    head: dict[str, torch.Tensor] = {"model.norm.weight": _norm(H, g).half()}
    if _head_exl2(cfg):
        head.update(random_linear(H, cfg.vocab_size, QPARAMS_HEAD[head_bits], g).to_dict("lm_head"))
    elif not cfg.tie_word_embeddings:
        head["lm_head.weight"] = (torch.randn(cfg.vocab_size, H, generator=g) * H**-0.5).half()
    w.add(head)
    weight_map = w.finish()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": w.bytes_written}, "weight_map": weight_map}, f, indent=1)
    wa, wm = block_weights(cfg)
    measured = decoder_bits / (L * (wa + wm))
    d = hf_config_dict(cfg, torch.float16)
    d["quantization_config"] = {
        "quant_method": "exl2",
        "version": f"mixq-{__version__}",
        "bits": bits,
        "head_bits": head_bits,
        "synthetic": True,
        "measured_bpw": round(measured, 4),
    }
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id[0]}, f, indent=2)
    report = {
        "arch": arch_name(cfg),
        "target_bpw": bits,
        "bpw": measured,
        "head_bits": head_bits,
        "seed": seed,
        "bytes": w.bytes_written,
        "attn_option": recipe.attn_index,
        "moe_option": recipe.moe_index,
    }
    with open(os.path.join(tmp, "mixq_synth.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    # A small real tokenizer; ids past its vocabulary simply never come out of encode().
    save_tokenizer(tmp, build_tokenizer([SAMPLE_TEXT] * 4, min(cfg.vocab_size, 4096)), cfg.max_position_embeddings)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    return report
