"""Check a whole checkpoint before any layer is built or converted.

`check_shapes` reads only the safetensors headers: every tensor config.json implies must exist with the
shape it implies (plain float matrices, or EXL2 tensor sets whose q_invperm/q_weight give the matrix size).
`scan_finite` reads every float tensor once, a run of rows at a time, and counts NaN/inf values; with
`exl2=True` it also reads and validates every EXL2 tensor set (q_groups, q_invperm a permutation, ...).
Both raise one CheckpointError line naming the first bad tensor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from mixq.errors import CheckpointError
from mixq.exl2.format import SUFFIXES, parse_exl2
from mixq.model.checkpoint import TensorIndex
from mixq.model.config import MixtralConfig
from mixq.model.finite import count_nonfinite, nonfinite_message

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_EXL2_DTYPES = {"q_weight": "I32", "q_invperm": "I32", "q_scale": "I32", "q_scale_max": "F16", "q_groups": "I16"}


@dataclass
class CheckReport:
    shapes_checked: int = 0  # tensors (or EXL2 sets) whose shape agreed with config.json
    tensors_scanned: int = 0  # float tensors read and found finite
    bytes_scanned: int = 0
    exl2_sets: int = 0  # EXL2 tensor sets read and validated
    seconds: float = 0.0


def linears(cfg: MixtralConfig, index: TensorIndex) -> Iterator[tuple[str, int, int]]:
    """(prefix, out_features, in_features) of every linear layer the loader builds from `index`."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    fused = "model.layers.0.mlp.experts.gate_up_proj" in index
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.self_attn.q_proj", cfg.q_size, H
        yield f"{p}.self_attn.k_proj", cfg.kv_size, H
        yield f"{p}.self_attn.v_proj", cfg.kv_size, H
        yield f"{p}.self_attn.o_proj", H, cfg.q_size
        if not fused:
            for e in range(cfg.num_local_experts):
                yield f"{p}.block_sparse_moe.experts.{e}.w1", I, H
                yield f"{p}.block_sparse_moe.experts.{e}.w2", H, I
                yield f"{p}.block_sparse_moe.experts.{e}.w3", I, H
    if not (cfg.tie_word_embeddings and "lm_head.weight" not in index and "lm_head.q_weight" not in index):
        yield "lm_head", cfg.vocab_size, H


def plain_tensors(cfg: MixtralConfig, index: TensorIndex) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every float tensor that is not part of a linear layer."""
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    fused = "model.layers.0.mlp.experts.gate_up_proj" in index
    yield "model.embed_tokens.weight", (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (H,)
        yield f"{p}.post_attention_layernorm.weight", (H,)
        if fused:
            yield f"{p}.mlp.gate.weight", (E, H)
            yield f"{p}.mlp.experts.gate_up_proj", (E, 2 * I, H)
            yield f"{p}.mlp.experts.down_proj", (E, H, I)
        else:
            yield f"{p}.block_sparse_moe.gate.weight", (E, H)
    yield "model.norm.weight", (H,)


def _missing(index: TensorIndex, key: str) -> CheckpointError:
    return CheckpointError(
        f"{key}: tensor missing from the *.safetensors files in {index.path} (incomplete download or "
        "a different architecture?)"
    )


def _float(index: TensorIndex, key: str, shape: tuple[int, ...]) -> None:
    if key not in index:
        raise _missing(index, key)
    if index.shape(key) != list(shape):
        raise CheckpointError(
            f"{key}: shape {index.shape(key)} disagrees with config.json (expected {list(shape)}); "
            "the checkpoint and its config.json do not belong together"
        )
    if index.dtype(key) not in FLOAT_DTYPES:
        raise CheckpointError(f"{key}: dtype {index.dtype(key)} is not a float type (F16, BF16, F32 or F64)")


def _exl2(index: TensorIndex, prefix: str, out_features: int, in_features: int) -> None:
    for s in SUFFIXES:
        key = f"{prefix}.{s}"
        if key not in index:
            raise CheckpointError(f"{key}: missing; an EXL2 layer needs {', '.join(SUFFIXES)}")
        if index.dtype(key) != _EXL2_DTYPES[s]:
            raise CheckpointError(f"{key}: dtype {index.dtype(key)} but EXL2 requires {_EXL2_DTYPES[s]}")
    k = index.shape(f"{prefix}.q_invperm")
    n = index.shape(f"{prefix}.q_weight")
    padded = -(-out_features // 32) * 32
    if len(k) != 1 or len(n) != 2 or (k[0], n[1]) != (in_features, padded):
        raise CheckpointError(
            f"{prefix}: EXL2 tensors (q_invperm {k}, q_weight {n}) disagree with config.json, which implies "
            f"{in_features} inputs and {padded} (padded) outputs; the checkpoint and its config.json do not "
            "belong together"
        )


def check_shapes(index: TensorIndex, cfg: MixtralConfig) -> int:
    """Headers only: every tensor config.json implies exists with its shape. Returns how many were checked."""
    n = 0
    for key, shape in plain_tensors(cfg, index):
        _float(index, key, shape)
        n += 1
    for prefix, out_f, in_f in linears(cfg, index):
        if prefix + ".q_weight" in index:
            _exl2(index, prefix, out_f, in_f)
        else:
            _float(index, prefix + ".weight", (out_f, in_f))
        n += 1
    return n


def scan_finite(index: TensorIndex, cfg: MixtralConfig | None = None, exl2: bool = True) -> CheckReport:
    """Read every float tensor once and count NaN/inf; raise on the first bad one, with how many more are bad."""
    t0 = time.perf_counter()
    report = CheckReport()
    bad: list[tuple[str, int, int]] = []
    for key in sorted(index.keys()):
        if index.dtype(key) not in FLOAT_DTYPES:
            continue
        count = total = 0
        for chunk in index.chunks(key):
            count += count_nonfinite(chunk)
            total += chunk.numel()
            report.bytes_scanned += chunk.numel() * chunk.element_size()
        if count:
            bad.append((key, count, total))
        report.tensors_scanned += 1
    index.close()  # the scan's pages need not stay mapped
    if bad:
        key, count, total = bad[0]
        raise CheckpointError(nonfinite_message(key, count, total, len(bad) - 1))
    if exl2 and cfg is not None:
        for prefix, out_f, in_f in linears(cfg, index):
            if prefix + ".q_weight" in index:
                parse_exl2(index.get_with_prefix(prefix), prefix, out_features=out_f, in_features=in_f)
                report.exl2_sets += 1
        index.close()
    report.seconds = time.perf_counter() - t0
    return report


def verify_checkpoint(path: str, cfg: MixtralConfig | None = None, scan: bool = False) -> CheckReport:
    """Shapes from the headers, then (with `scan`) every value; the one-line error names the first bad tensor."""
    cfg = cfg or MixtralConfig.from_dir(path)
    index = TensorIndex(path)
    t0 = time.perf_counter()
    n = check_shapes(index, cfg)
    report = scan_finite(index, cfg) if scan else CheckReport()
    report.shapes_checked = n
    report.seconds = time.perf_counter() - t0
    return report
