"""`mixq info`: what a checkpoint holds, read from the safetensors headers (nothing is loaded).

Every tensor's shape is checked against config.json from the headers; `--check` also reads every value
(NaN/inf in float tensors, EXL2 tensor sets validated) without building the model.

For EXL2 layers the bits per weight are the bytes of the layer's tensors × 8 / (K·N), which is exactly
exllamav2's accounting (weights + q_scale + q_scale_max + q_groups + q_invperm).
"""

from __future__ import annotations

import json
import os

import torch

from mixq.kernels.ops import cuda_ops_available
from mixq.model.checkpoint import TensorIndex
from mixq.model.config import MixtralConfig
from mixq.model.verify import check_shapes, scan_finite

_DTYPE_BITS = {"F32": 32, "F16": 16, "BF16": 16, "I32": 32, "I16": 16, "I64": 64, "U8": 8, "I8": 8}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def linear_bits(index: TensorIndex, prefix: str) -> tuple[int, int, str]:
    """(bits stored, K·N weights, format) of one linear layer."""
    if prefix + ".q_weight" in index:
        bits = 0
        for suffix in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "bias"):
            key = f"{prefix}.{suffix}"
            if key in index:
                bits += _numel(index.shape(key)) * _DTYPE_BITS[index.dtype(key)]
        k = index.shape(prefix + ".q_invperm")[0]
        n = index.shape(prefix + ".q_weight")[1]
        return bits, k * n, "exl2"
    return tensor_bits(index, prefix + ".weight")


def tensor_bits(index: TensorIndex, key: str) -> tuple[int, int, str]:
    """(bits stored, elements, dtype name) of one float tensor."""
    n = _numel(index.shape(key))
    return n * _DTYPE_BITS[index.dtype(key)], n, index.dtype(key).lower()


def layer_table(index: TensorIndex, cfg: MixtralConfig) -> list[dict]:
    """Per decoder layer: bpw of the attention block and of the MoE block (all experts)."""
    rows = []
    fused = "model.layers.0.mlp.experts.gate_up_proj" in index
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        attn = [linear_bits(index, f"{p}.self_attn.{m}_proj") for m in "qkvo"]
        if fused:
            moe = [tensor_bits(index, f"{p}.mlp.experts.{n}") for n in ("gate_up_proj", "down_proj")]
        else:
            moe = [
                linear_bits(index, f"{p}.block_sparse_moe.experts.{e}.{w}")
                for e in range(cfg.num_local_experts)
                for w in ("w1", "w3", "w2")
            ]
        rows.append(
            {
                "layer": i,
                "attn_bpw": sum(b for b, _, _ in attn) / sum(n for _, n, _ in attn),
                "moe_bpw": sum(b for b, _, _ in moe) / sum(n for _, n, _ in moe),
                "format": "/".join(sorted({f for _, _, f in attn + moe})),
            }
        )
    return rows


def describe(path: str, device: str = "auto", dtype: str = "auto", check: bool = False) -> str:
    """The report; raises CheckpointError (one line) if a tensor disagrees with config.json or, with `check`,
    holds NaN/inf or is not valid EXL2."""
    cfg = MixtralConfig.from_dir(path)
    index = TensorIndex(path)
    n_checked = check_shapes(index, cfg)
    scanned = scan_finite(index, cfg) if check else None
    table = layer_table(index, cfg)
    total_params = sum(_numel(index.shape(k)) for k in index.keys() if index.dtype(k) in ("F16", "BF16", "F32"))
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    attn = H * cfg.q_size * 2 + H * cfg.kv_size * 2
    expert = 3 * H * I
    n_weights = cfg.num_hidden_layers * (attn + E * expert + E * H) + 2 * cfg.vocab_size * H
    active = cfg.num_hidden_layers * (attn + cfg.num_experts_per_tok * expert + E * H) + 2 * cfg.vocab_size * H
    quant = cfg.raw.get("quantization_config") or {}
    n_files = len(set(index.key_to_file.values()))
    lines = [
        f"model        {os.path.abspath(path)}",
        f"architecture MixtralForCausalLM: {cfg.num_hidden_layers} layers, hidden {H}, intermediate {I}, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads x {cfg.head_dim}, "
        f"{E} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}",
        f"parameters   {_count(n_weights)} total, {_count(active)} active per token"
        + (f" ({total_params / 1e6:.1f} M stored as float)" if quant else ""),
        f"context      {cfg.max_position_embeddings} positions, rope theta {cfg.rope_theta:g}"
        + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""),
        f"files        {index.total_bytes() / 2**20:.1f} MiB in {n_files} safetensors file(s)",
    ]
    if quant:
        lines.append(
            f"quantization {quant.get('quant_method', '?')} target {quant.get('bits')} bpw, "
            f"head {quant.get('head_bits')} bits"
        )
    lines.append(f"kernels      {kernel_path(device)}")
    lines.append(f"shapes       {n_checked} tensors and EXL2 sets agree with config.json")
    if scanned is not None:
        sets = f"; {scanned.exl2_sets} EXL2 tensor sets are valid" if scanned.exl2_sets else ""
        lines.append(
            f"check        {scanned.tensors_scanned} float tensors ({scanned.bytes_scanned / 2**20:.1f} MiB) hold no "
            f"NaN or inf{sets} ({scanned.seconds:.2f} s)"
        )
    measured = _conversion_errors(path)
    lines.append("")
    lines.append("layer  attn bpw  moe bpw  format" + ("    attn err   moe err" if measured else ""))
    for row in table:
        line = f"{row['layer']:5d}  {row['attn_bpw']:8.3f}  {row['moe_bpw']:7.3f}  {row['format']:<8}"
        if measured:
            errs = measured.get(row["layer"], {})
            line += f"  {errs.get('attn', float('nan')):9.5f} {errs.get('moe', float('nan')):9.5f}"
        lines.append(line)
    return "\n".join(lines)


def kernel_path(device: str = "auto") -> str:
    """Which implementation runs quantized layers on this machine (never silent)."""
    want_cuda = device in ("auto", None) and torch.cuda.is_available() or str(device).startswith("cuda")
    if want_cuda and cuda_ops_available():
        return "mixq CUDA kernels (mixq._C)"
    if want_cuda:
        return "PyTorch reference on CUDA (the mixq._C extension is not built)"
    return "PyTorch reference on CPU"


def _conversion_errors(path: str) -> dict[int, dict[str, float]]:
    """Per-layer predicted error of the chosen recipes, if the converter left its report."""
    report = os.path.join(path, "mixq_convert.json")
    if not os.path.exists(report):
        return {}
    try:
        with open(report, encoding="utf-8") as f:
            layers = json.load(f).get("layers", [])
        return {int(r["layer"]): {"attn": float(r["attn_err"]), "moe": float(r["moe_err"])} for r in layers}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
