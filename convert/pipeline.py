"""`mixq convert`: Hugging Face Mixtral -> EXL2 at a target average bpw.

Passes (each resumable per layer from the work directory):
1. measurement: for every layer, GPTQ each matrix with every candidate recipe and record the block
   output error against the float block (inputs: the float model's own hidden states);
2. optimize: one candidate per attention block and per MoE block, Σ error least within the budget;
3. quantization: GPTQ with the chosen recipes, each layer fed the outputs of the quantized layers
   before it; every packed matrix is dequantized again and checked;
4. compile: shards + config.json + copied tokenizer files, written under a temporary name and renamed.
Only one decoder layer is in memory at a time.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mixq.errors import MixqError
from mixq.exl2.gptq import gptq_quantize, rtn_quantize
from mixq.exl2.qparams import QPARAMS_HEAD, QParams, parse_recipe
from mixq.model.archs import check_exl2_shapes
from mixq.model.config import MixtralConfig
from mixq.model.loader import _Builder, resolve_device
from mixq.model.tokenizer import load_tokenizer
from mixq.model.verify import verify_checkpoint

from .calibration import BUILTIN, read_texts, token_rows
from .candidates import ATTN_KEYS, MOE_KEYS, attn_candidates, moe_candidates
from .failure import reported, resume_hint
from .hostmem import peak_rss_gib, release_free_memory
from .job import Job, atomic_tensors
from .layer_quant import LayerQuantizer
from .measurement import load_measurement, model_identity
from .optimize import Option, anneal, solve
from .progress import Progress
from .writer import CheckpointWriter, check_output_dir

HEAD_BITS = (2, 3, 4, 5, 6, 8)


@dataclass
class ConvertOptions:
    bits: float = 4.0
    head_bits: int = 6
    calibration: list[str] = field(default_factory=list)
    rows: int | None = None  # quantization-pass rows (default: up to 100 that the text fills)
    measure_rows: int | None = None  # measurement-pass rows (default: min(16, rows))
    length: int | None = None  # tokens per row (default: 2048, capped at the model's context)
    measurement: str | None = None  # reuse a measurement.json (skips the measurement pass)
    device: str = "auto"
    work_dir: str | None = None
    shard_mb: int = 8192
    moe_hessian: str = "auto"  # "shared" (exllamav2), "routed", or "auto" (measure both per layer)
    extended_candidates: bool = True
    optimizer: str = "dp"  # "dp" (exact knapsack) or "anneal" (exllamav2's procedure)
    # Baselines for the quality table: one recipe for every matrix (no measurement, no optimizer),
    # quantized with "gptq" or "rtn" (round-to-nearest with the same scales).
    uniform: str | None = None
    method: str = "gptq"


def _kill_hook(stage: str, layer: int) -> None:
    """Tests simulate a crash here (SIGKILL, no cleanup) with MIXQ_TEST_KILL_AFTER=stage:layer, or Ctrl-C with
    MIXQ_TEST_KILL_SIGNAL=INT as well."""
    if os.environ.get("MIXQ_TEST_KILL_AFTER") == f"{stage}:{layer}":
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("MIXQ_TEST_KILL_SIGNAL", "KILL")))


def _calibration(tok, cfg: MixtralConfig, opts: ConvertOptions) -> tuple[torch.Tensor, str]:
    files = opts.calibration or [BUILTIN]
    docs = read_texts(files)
    length = min(opts.length or 2048, cfg.max_position_embeddings)
    source = ", ".join(os.path.basename(f) for f in files)
    if opts.rows is not None:
        return token_rows(tok, docs, opts.rows, length, source), source
    n_tokens = sum(len(tok.encode(d)) for d in docs)
    rows = min(100, n_tokens // length)
    if rows < 4:
        raise MixqError(
            f"{source}: calibration text is too short: {n_tokens} tokens make {rows} rows of {length} "
            "(4 needed); add text or lower --length"
        )
    return token_rows(tok, docs, rows, length, source), source


def _weights(cfg: MixtralConfig) -> tuple[int, int]:
    """(weights of one attention block, of one MoE block), as the bpw budget counts them."""
    H = cfg.hidden_size
    return H * cfg.q_size * 2 + H * cfg.kv_size * 2, cfg.num_local_experts * 3 * H * cfg.intermediate_size


def convert(src: str, out: str, opts: ConvertOptions | None = None, log=print) -> dict:
    """Convert `src` to EXL2 in `out`. A failure ends in one MixqError line (or KeyboardInterrupt) that says
    whether and where the same command resumes; nothing is left behind that a rerun would not use."""
    opts = opts or ConvertOptions()
    work_dir = opts.work_dir or out.rstrip("/") + ".work"
    run: dict = {}  # filled by _convert: the job, once it exists, and whether it measures itself

    def hint() -> str | None:
        if "job" not in run:
            return None
        return resume_hint(run["job"].state, run["layers"], run["own_measure"], work_dir)

    with reported(out, work_dir, not os.path.exists(work_dir), hint):
        return _convert(src, out, opts, work_dir, run, log)


def _convert(src: str, out: str, opts: ConvertOptions, work_dir: str, run: dict, log) -> dict:
    t_start = time.time()
    check_output_dir(out)
    cfg = MixtralConfig.from_dir(src)
    check_exl2_shapes(cfg, os.path.join(src, "config.json"))
    if opts.head_bits not in HEAD_BITS:
        raise MixqError(f"--head-bits {opts.head_bits}: must be one of {', '.join(map(str, HEAD_BITS))}")
    if opts.moe_hessian not in ("auto", "shared", "routed"):
        raise MixqError(f"--moe-hessian {opts.moe_hessian}: must be auto, shared or routed")
    attn_c, moe_c = attn_candidates(opts.extended_candidates), moe_candidates(opts.extended_candidates)
    if opts.uniform:
        qp = parse_recipe(opts.uniform)
        attn_c, moe_c = [dict.fromkeys(ATTN_KEYS, qp)], [dict.fromkeys(MOE_KEYS, qp)]
        wa, wm = _weights(cfg)
        opts.bits = (_block_bits(attn_c[0], cfg) + _block_bits(moe_c[0], cfg)) / (wa + wm)
    _check_bits_reachable(cfg, opts.bits, attn_c, moe_c)
    device = resolve_device(opts.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # Every shape and every value of the source, before the first layer: a bad last layer is not found hours in.
    checked = verify_checkpoint(src, cfg, scan=True)
    log(
        f"checked {src}: {checked.shapes_checked} tensors agree with config.json, no NaN or inf in "
        f"{checked.bytes_scanned / 2**30:.2f} GiB ({checked.seconds:.1f} s)"
    )
    builder = _Builder(src, cfg, device, dtype)
    identity = model_identity(cfg, builder.index)
    tok = load_tokenizer(src)
    cal, cal_source = _calibration(tok, cfg, opts)
    n_measure = min(opts.measure_rows or 16, cal.shape[0])
    reuse = None
    if opts.measurement:
        reuse = load_measurement(opts.measurement, cfg, identity, lambda row: _block_bits(row, cfg))
    fingerprint = {
        "src": os.path.abspath(src),
        "bits": opts.bits,
        "head_bits": opts.head_bits,
        "cal": hashlib.sha256(cal.numpy().tobytes()).hexdigest(),
        "measure_rows": n_measure,
        "moe_hessian": opts.moe_hessian,
        "extended": opts.extended_candidates,
        "optimizer": opts.optimizer,
        "measurement": hashlib.sha256(repr(reuse).encode()).hexdigest() if reuse else None,
        "work_format": 2,  # hidden states per layer (job.py); a work directory of format 1 is refused, not misread
    }
    job = Job(work_dir, fingerprint)
    run.update(job=job, layers=cfg.num_hidden_layers, own_measure=reuse is None and not opts.uniform)
    if job.resumed:
        log(
            f"resuming the conversion in {job.dir} (measured {job.state['measure_done'] + 1}, "
            f"quantized {job.state['quant_done'] + 1} of {cfg.num_hidden_layers} layers)"
        )
    if reuse is not None and job.state["measure_done"] < cfg.num_hidden_layers - 1:
        job.state.update(
            measurement=reuse["measurement"], w13=reuse.get("w13", {}), measure_done=cfg.num_hidden_layers - 1
        )
        job.save()
    if opts.uniform and job.state["strategy"] is None:
        job.state.update(
            measure_done=cfg.num_hidden_layers - 1, w13={}, strategy=_uniform_strategy(cfg, attn_c[0], moe_c[0])
        )
        job.save()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        w = builder.tensor("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        return F.embedding(ids.to(device), w).to(torch.float16).cpu()

    def layer_q(i: int) -> LayerQuantizer:
        layer = builder.layer(i)
        builder.index.close()  # drop the shard mappings so host memory stays at one layer
        return LayerQuantizer(layer, i, cfg.rope_theta, cfg.sliding_window, opts.method)

    # 1. measurement ------------------------------------------------------------------------------------
    L = cfg.num_hidden_layers
    if job.state["measure_done"] < L - 1:
        if job.state["measure_done"] < 0:
            job.save_hidden("measure", 0, embed(cal[:n_measure]))
        steps = LayerQuantizer.steps(cfg.num_local_experts, len(attn_c), len(moe_c), opts.moe_hessian == "auto")
        bar = Progress(L, steps, "measure ", done=job.state["measure_done"] + 1)
        for i in range(job.state["measure_done"] + 1, L):
            x = job.load_hidden("measure", i).to(device, dtype)
            lq = layer_q(i)
            lq.tick = bar.step
            bar.note(f"layer {i}")
            job.state["measurement"][f"model.layers.{i}.self_attn"], h = lq.measure_attn(x, attn_c)
            entries, mode, out_x = lq.measure_moe(h, moe_c, opts.moe_hessian)
            job.state["measurement"][f"model.layers.{i}.block_sparse_moe"] = entries
            job.state.setdefault("w13", {})[str(i)] = mode
            job.save_hidden("measure", i + 1, out_x.to(torch.float16))
            _kill_hook("measure-saved", i)
            job.finish_layer("measure", i)
            del lq, x, h, out_x
            release_free_memory()
            bar.layer_done(i, f"layer {i}, w1/w3 Hessian: {mode}")
            _kill_hook("measure", i)
        bar.close()

    # 2. optimize ----------------------------------------------------------------------------------------
    if job.state["strategy"] is None:
        job.state["strategy"] = _optimize(cfg, job.state["measurement"], opts)
        job.save()
    strategy = job.state["strategy"]

    # 3. quantization ------------------------------------------------------------------------------------
    if job.state["quant_done"] < 0:
        job.save_hidden("quant", 0, embed(cal))
    bar = Progress(L, LayerQuantizer.steps(cfg.num_local_experts), "quantize", done=job.state["quant_done"] + 1)
    for i in range(job.state["quant_done"] + 1, L):
        x = job.load_hidden("quant", i).to(device, dtype)
        lq = layer_q(i)
        lq.tick = bar.step
        bar.note(f"layer {i}")
        attn_row = _row(strategy[f"model.layers.{i}.self_attn"], ("q_proj", "k_proj", "v_proj", "o_proj"))
        moe_row = _row(strategy[f"model.layers.{i}.block_sparse_moe"], ("w1", "w3", "w2"))
        mats, x_next, errs = lq.quantize_layer(x, attn_row, moe_row, job.state.get("w13", {}).get(str(i), "shared"))
        tensors = {}
        for name, t in mats.items():
            prefix = (
                f"model.layers.{i}.self_attn.{name}"
                if "proj" in name
                else f"model.layers.{i}.block_sparse_moe.experts.{name}"
            )
            tensors.update(t.to_dict(prefix))
        atomic_tensors(job.layer_file(i), tensors)
        job.save_hidden("quant", i + 1, x_next.to(torch.float16))
        _kill_hook("quant-saved", i)
        job.state.setdefault("layer_errors", {})[str(i)] = errs
        job.finish_layer("quant", i)
        del lq, x, x_next
        release_free_memory()
        bar.layer_done(i, f"layer {i}: attn err {errs['attn_err']:.5f}, moe err {errs['moe_err']:.5f}")
        _kill_hook("quant", i)
    bar.close()

    # 4. head and compile --------------------------------------------------------------------------------
    head_file = job.layer_file("head")
    if not os.path.exists(head_file):
        head = _quantize_head(builder, cfg, job, opts, cal[:n_measure], device, dtype, log)
        atomic_tensors(head_file, head)
    writer = CheckpointWriter(out, opts.shard_mb)
    for part in _output_parts(builder, cfg, job):
        writer.add(part)
    summary = _report(cfg, job, strategy, opts, load_file(head_file))
    quant_config = {
        "bits": opts.bits,
        "head_bits": opts.head_bits,
        "calibration": {"rows": int(cal.shape[0]), "length": int(cal.shape[1]), "dataset": cal_source},
    }
    measurement = {
        "measurement": _with_nulls(job.state["measurement"], cfg),
        "last_module_idx": 2 * cfg.num_hidden_layers + 2,
        "w13": job.state.get("w13", {}),
        "model": identity,
    }
    writer.finish(src, quant_config, {"measurement.json": measurement, "mixq_convert.json": summary})
    shutil.rmtree(job.dir, ignore_errors=True)
    # This run's cost is returned and printed, not written: the output is the same however often it was resumed.
    summary.update(
        seconds=round(time.time() - t_start, 1),
        peak_rss_gib=round(peak_rss_gib(), 3),
        peak_vram_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else 0,
    )
    _print_table(summary, log)
    return summary


def _block_bits(row: dict[str, QParams], cfg: MixtralConfig) -> int:
    """Total bits of one block (all experts for MoE) with the recipes of one candidate row."""
    H, I, kv, q = cfg.hidden_size, cfg.intermediate_size, cfg.kv_size, cfg.q_size
    shapes = {
        "q_proj": (H, q),
        "k_proj": (H, kv),
        "v_proj": (H, kv),
        "o_proj": (q, H),
        "w1": (H, I),
        "w3": (H, I),
        "w2": (I, H),
    }
    experts = cfg.num_local_experts if "w1" in row else 1
    return experts * sum(qp.total_bits(*shapes[k]) for k, qp in row.items())


def _check_bits_reachable(cfg: MixtralConfig, bits: float, attn_c: list, moe_c: list) -> None:
    wa, wm = _weights(cfg)
    a = [_block_bits(r, cfg) for r in attn_c]
    m = [_block_bits(r, cfg) for r in moe_c]
    lo, hi = (min(a) + min(m)) / (wa + wm), (max(a) + max(m)) / (wa + wm)
    if not lo <= bits <= hi:
        raise MixqError(
            f"--bits {bits:g}: the candidate recipes reach {lo:.2f} to {hi:.2f} bpw for this model; "
            "choose a target in that range"
        )


def _row(entry: dict, keys: tuple[str, ...]) -> dict[str, QParams]:
    return {k: QParams.from_dict(entry[k]) for k in keys}


def _optimize(cfg: MixtralConfig, measurement: dict, opts: ConvertOptions) -> dict:
    wa, wm = _weights(cfg)
    budget = int(cfg.num_hidden_layers * (wa + wm) * opts.bits)
    keys = [f"model.layers.{i}.{b}" for i in range(cfg.num_hidden_layers) for b in ("self_attn", "block_sparse_moe")]
    slots = [[Option(int(e["total_bits"]), 1.0 - float(e["accuracy"])) for e in measurement[k]] for k in keys]
    picks = anneal(slots, budget) if opts.optimizer == "anneal" else solve(slots, budget)
    return {k: {**measurement[k][j], "index": j} for k, j in zip(keys, picks)}


def _uniform_strategy(cfg: MixtralConfig, attn_row: dict, moe_row: dict) -> dict:
    def entry(row):
        return {
            "accuracy": float("nan"),
            "total_bits": _block_bits(row, cfg),
            "index": 0,
            **{k: qp.to_dict() for k, qp in row.items()},
        }

    return {
        f"model.layers.{i}.{b}": entry(row)
        for i in range(cfg.num_hidden_layers)
        for b, row in (("self_attn", attn_row), ("block_sparse_moe", moe_row))
    }


def _quantize_head(builder, cfg, job, opts, cal_ids, device, dtype, log) -> dict[str, torch.Tensor]:
    """lm_head at `head_bits`, Hessian from the final-norm outputs of the quantized model; prints the
    calibration perplexity as exllamav2 does (above ~30 something went wrong)."""
    x = job.load_hidden("quant", cfg.num_hidden_layers).to(device, dtype)
    norm_w = builder.tensor("model.norm.weight", (cfg.hidden_size,))
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(dtype) * norm_w
    flat = h.reshape(-1, cfg.hidden_size).float()
    H = flat.T @ flat / flat.shape[0]
    key = "lm_head.weight" if "lm_head.weight" in builder.index else "model.embed_tokens.weight"
    W = builder.tensor(key, (cfg.vocab_size, cfg.hidden_size)).float()
    qp = QPARAMS_HEAD[opts.head_bits]
    res = gptq_quantize(W, H, qp) if opts.method == "gptq" else rtn_quantize(W, qp, H=H)
    n = cal_ids.shape[0]
    logits = h[:n].float() @ res.fake.float().T
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), cal_ids[:, 1:].reshape(-1).to(device))
    log(f"calibration perplexity of the quantized model: {math.exp(nll.item()):.3f}")
    job.state["cal_ppl"] = math.exp(nll.item())
    job.save()
    return res.exl2.to_dict("lm_head")


def _output_parts(builder, cfg: MixtralConfig, job: Job) -> Iterator[dict[str, torch.Tensor]]:
    """The output tensors a layer at a time: fp16 embedding, norms and routers, EXL2 linears from the
    work directory, the head."""
    H = cfg.hidden_size

    def f16(key, shape, src_key=None) -> dict[str, torch.Tensor]:
        return {key: builder.tensor(src_key or key, shape).to(torch.float16).cpu()}

    yield f16("model.embed_tokens.weight", (cfg.vocab_size, H))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        gate = f"{p}.block_sparse_moe.gate.weight"
        yield {
            **f16(f"{p}.input_layernorm.weight", (H,)),
            **f16(f"{p}.post_attention_layernorm.weight", (H,)),
            **f16(gate, (cfg.num_local_experts, H), gate if gate in builder.index else f"{p}.mlp.gate.weight"),
            **load_file(job.layer_file(i)),
        }
    yield {**f16("model.norm.weight", (H,)), **load_file(job.layer_file("head"))}


def _with_nulls(measurement: dict, cfg: MixtralConfig) -> dict:
    """exllamav2 lists the final norm and head with null values."""
    return {**measurement, "model.norm.norm": None, "lm_head.linear": None}


def _report(cfg: MixtralConfig, job: Job, strategy: dict, opts: ConvertOptions, head: dict) -> dict:
    wa, wm = _weights(cfg)
    layers, total_bits = [], 0
    for i in range(cfg.num_hidden_layers):
        a, m = strategy[f"model.layers.{i}.self_attn"], strategy[f"model.layers.{i}.block_sparse_moe"]
        errs = job.state.get("layer_errors", {}).get(str(i), {})
        total_bits += a["total_bits"] + m["total_bits"]
        layers.append(
            {
                "layer": i,
                "attn_bpw": a["total_bits"] / wa,
                "moe_bpw": m["total_bits"] / wm,
                "attn_err": errs.get("attn_err"),
                "moe_err": errs.get("moe_err"),
                "attn_option": a["index"],
                "moe_option": m["index"],
                "w13_hessian": job.state.get("w13", {}).get(str(i)),
            }
        )
    head_bits = sum(v.numel() * v.element_size() * 8 for k, v in head.items() if k.startswith("lm_head."))
    return {
        "bpw": total_bits / (cfg.num_hidden_layers * (wa + wm)),
        "target_bpw": opts.bits,
        "head_bpw": head_bits / (cfg.vocab_size * cfg.hidden_size),
        "layers": layers,
        "calibration_ppl": job.state.get("cal_ppl"),
        "options": asdict(opts),
    }


def _print_table(summary: dict, log) -> None:
    log("layer  attn bpw  moe bpw   attn err    moe err  w1/w3 Hessian")
    for r in summary["layers"]:
        log(
            f"{r['layer']:5d}  {r['attn_bpw']:8.3f}  {r['moe_bpw']:7.3f}  {r['attn_err']:9.6f}  {r['moe_err']:9.6f}"
            f"  {r['w13_hessian']}"
        )
    log(
        f"decoder bpw {summary['bpw']:.3f} (target {summary['target_bpw']:g}), head {summary['head_bpw']:.3f} bpw; "
        f"{summary['seconds']:.1f} s, peak host memory {summary['peak_rss_gib']:.2f} GiB"
        + (f", peak VRAM {summary['peak_vram_gib']:.2f} GiB" if summary["peak_vram_gib"] else "")
    )
