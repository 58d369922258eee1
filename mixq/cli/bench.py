"""`mixq bench`: end-to-end prefill and decode speed, time to first token, peak memory, decode bandwidth use.

Runs the real generation engine (continuous batching over the paged cache) on random token prompts:

* prefill: one sequence of `--prompt-len` tokens in chunks of up to 2048; time to first token and tokens/s;
* decode, per batch size b: b sequences are prefilled, then `--gen-len` engine steps in which every sequence
  decodes one token are timed (each request is long enough to stay alive through the whole window);
* decode bandwidth fraction = bytes read per step / step time / device copy bandwidth, where the bytes are
  the attention, router, norm and head weights, the expected number of distinct experts the batch routes to
  per layer, E (1 - (1 - k/E)^b) under uniform routing, times one expert's bytes, and the K/V cache of every
  sequence at its mean context during the window. The embedding is not counted (only b rows are read).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import mixq
from mixq.engine.generate import Engine, Request
from mixq.engine.planner import preflight
from mixq.engine.sampling import SamplingParams
from mixq.errors import MixqError
from mixq.kernels.kv_quant import bytes_per_value
from mixq.model.archs import arch_name

PREFILL_CHUNK = 2048
PAGE_SIZE = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Copy bandwidth in GB/s (bytes read + written), from bench/common.py on CUDA when importable."""
    if device.type == "cuda":
        try:
            from bench.common import copy_bandwidth_gbs

            return float(copy_bandwidth_gbs())
        except ImportError:
            pass
    n = (256 << 20) if device.type == "cuda" else (64 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best / 1e9


def _module_bytes(m: torch.nn.Module) -> int:
    ts = list(m.parameters()) + [b for b in m.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in ts)


def weight_traffic(model) -> tuple[int, list[float]]:
    """(bytes read every step whatever the batch, per layer the bytes of one expert)."""
    always = _module_bytes(model.lm_head) + _module_bytes(model.model.norm)
    per_expert = []
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        always += _module_bytes(layer.self_attn) + _module_bytes(moe.gate)
        always += _module_bytes(layer.input_layernorm) + _module_bytes(layer.post_attention_layernorm)
        # The experts' bytes wherever they live: the per-expert modules, or their stack once fused (SparseMoE.fuse).
        per_expert.append((_module_bytes(moe) - _module_bytes(moe.gate)) / moe.num_experts)
    return always, per_expert


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts hit by `batch` tokens routing uniformly to `top_k` of `num_experts`."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


class _Memory:
    def __init__(self, device: torch.device):
        self.device, self.device_peak = device, 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.sample()

    def sample(self) -> None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_peak = max(self.device_peak, total - free)

    def result(self) -> tuple[float | None, float | None]:
        if self.device.type != "cuda":
            return None, None
        self.sample()
        return torch.cuda.max_memory_allocated(self.device) / 2**30, self.device_peak / 2**30


def _request(vocab: int, n: int, new: int, g: torch.Generator):
    ids = torch.randint(0, vocab, (n,), generator=g).tolist()
    return Request(ids, new, SamplingParams(temperature=0.0), eos_ids=[])


def _engine(model, batch: int, prompt_len: int, new: int, cache_mode: str, cuda_graphs: bool = False):
    per_seq = prompt_len + new + 1
    return Engine(
        model,
        max_batch=batch,
        page_size=PAGE_SIZE,
        cache_tokens=batch * -(-per_seq // PAGE_SIZE) * PAGE_SIZE,  # whole pages per sequence: all run at once
        max_seq_len=per_seq,
        step_tokens=max(batch, PREFILL_CHUNK),
        cache_mode=cache_mode,
        cuda_graphs=cuda_graphs,
    )


def _new_tokens(batch: int, prompt_len: int, gen_len: int) -> int:
    """Tokens per request so it stays alive while the others prefill and through the timed window."""
    return gen_len + math.ceil(batch * prompt_len / max(batch, PREFILL_CHUNK)) + 4


def run_bench(
    model,
    batches: list[int],
    prompt_len: int,
    gen_len: int,
    cache_mode: str = "fp16",
    seed: int = 0,
    cuda_graphs: bool = True,
) -> dict:
    cfg, dev = model.config, model.device
    if prompt_len < 1 or gen_len < 1 or not batches or min(batches) < 1:
        raise MixqError("--prompt-len, --gen-len and every --batch must be at least 1")
    longest = prompt_len + _new_tokens(max(batches), prompt_len, gen_len) + 1
    if longest > cfg.max_position_embeddings:
        raise MixqError(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} (+ tokens decoded while the batch prefills) needs "
            f"{longest} positions but the model has {cfg.max_position_embeddings}; lower them"
        )
    g = torch.Generator().manual_seed(seed)
    mem = _Memory(dev)
    # Warm-up: first use builds per-layer state (dequantized weights on the reference path, kernels, allocator).
    eng = _engine(model, 1, 8, 2, cache_mode)
    eng.add(_request(cfg.vocab_size, 8, 2, g))
    eng.results()
    del eng

    eng = _engine(model, 1, prompt_len, 1, cache_mode)
    eng.add(_request(cfg.vocab_size, prompt_len, 1, g))
    _sync(dev)
    t = time.perf_counter()
    while not eng.step():
        pass
    _sync(dev)
    ttft = time.perf_counter() - t
    mem.sample()
    del eng

    always, per_expert = weight_traffic(model)
    cache_per_token = 2 * cfg.num_hidden_layers * cfg.kv_size * bytes_per_value(cache_mode)
    bw = copy_bandwidth(dev)
    decode, graphed = [], False
    for b in batches:
        new = _new_tokens(b, prompt_len, gen_len)
        eng = _engine(model, b, prompt_len, new, cache_mode, cuda_graphs)
        for _ in range(b):
            eng.add(_request(cfg.vocab_size, prompt_len, new, g))
        started: set = set()
        while len(started) < b:
            started.update(o.request_id for o in eng.step())
        eng.step()  # one decode step untimed: it captures this batch's CUDA graph when graphs are on
        graphed = graphed or bool(eng.graphs is not None and eng.graphs.graphs)
        _sync(dev)
        ctx = sum(s.state.length for s in eng.running) / b
        t = time.perf_counter()
        for _ in range(gen_len):
            outs = eng.step()
            if len(outs) != b:
                raise RuntimeError(f"decode step produced {len(outs)} tokens for batch {b}")  # engine bug
        _sync(dev)
        dt = time.perf_counter() - t
        ctx = (ctx + sum(s.state.length for s in eng.running) / b) / 2
        mem.sample()
        del eng
        k, E = cfg.num_experts_per_tok, cfg.num_local_experts
        step_bytes = always + sum(expected_experts(E, k, b) * pe for pe in per_expert) + b * ctx * cache_per_token
        step = dt / gen_len
        decode.append(
            {
                "batch": b,
                "tokens_per_s": b / step,
                "step_ms": step * 1e3,
                "context": round(ctx),
                "bytes_per_step": int(step_bytes),
                "bw_fraction": step_bytes / step / (bw * 1e9),
            }
        )
    alloc_peak, device_peak = mem.result()
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cache": cache_mode,
        "cuda_graphs": graphed,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "prefill_tokens_per_s": prompt_len / ttft,
        "time_to_first_token_s": ttft,
        "copy_bandwidth_gbs": bw,
        "decode": decode,
        "peak_vram_allocated_gib": alloc_peak,
        "peak_vram_device_gib": device_peak,
    }


def format_table(res: dict, title: str) -> str:
    lines = [
        f"mixq bench {title} on {res['device']}, {res['cache']} cache, prompt {res['prompt_len']}, "
        f"decode {'in CUDA graphs' if res['cuda_graphs'] else 'eager'}, "
        f"gen {res['gen_len']}",
        f"prefill {res['prefill_tokens_per_s']:.1f} tok/s, time to first token {res['time_to_first_token_s']:.3f} s",
        f"copy bandwidth {res['copy_bandwidth_gbs']:.1f} GB/s",
        "batch  decode tok/s   ms/step  context  GB/step  bw fraction",
    ]
    for d in res["decode"]:
        lines.append(
            f"{d['batch']:5d}  {d['tokens_per_s']:12.1f}  {d['step_ms']:8.2f}  {d['context']:7d}  "
            f"{d['bytes_per_step'] / 1e9:7.3f}  {d['bw_fraction']:11.3f}"
        )
    if res["peak_vram_allocated_gib"] is not None:
        lines.append(
            f"peak VRAM: allocator {res['peak_vram_allocated_gib']:.2f} GiB, "
            f"device-wide {res['peak_vram_device_gib']:.2f} GiB"
        )
    return "\n".join(lines)


def record(res: dict, config: dict, command: str) -> int:
    """Append the measured figures to bench/results.jsonl (MIXQ_RESULTS overrides the path)."""
    try:
        from bench.common import record as rec
    except ImportError:
        raise MixqError("--record: run from the repository root, where bench/results.py lives") from None
    ctx = res["prompt_len"] + res["gen_len"]
    base = {**config, "cache": res["cache"], "impl": "mixq", "cuda_graphs": res["cuda_graphs"]}
    n = 0
    for metric, value, unit, extra in [
        ("prefill_tokens_per_s", res["prefill_tokens_per_s"], "tok/s", {"tokens": res["prompt_len"]}),
        ("time_to_first_token", res["time_to_first_token_s"], "s", {"tokens": res["prompt_len"]}),
        ("copy_bandwidth", res["copy_bandwidth_gbs"], "GB/s", {}),
    ] + [
        (m, d[k], u, {"batch": d["batch"], "context": d["context"]})
        for d in res["decode"]
        for m, k, u in (
            ("decode_tokens_per_s", "tokens_per_s", "tok/s"),
            ("decode_bw_fraction", "bw_fraction", "fraction"),
        )
    ]:
        rec(metric, round(value, 6), unit, {**base, **extra}, command=command)
        n += 1
    if res["peak_vram_device_gib"] is not None:
        rec(
            "peak_vram_gib",
            round(res["peak_vram_device_gib"], 3),
            "GiB",
            {**base, "context": ctx, "batch": max(d["batch"] for d in res["decode"])},
            command=command,
        )
        n += 1
    return n


def _batches(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give batch sizes like 1,4,16") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: batch sizes must be at least 1")
    return out


def cmd_bench(args) -> None:
    # On CUDA: refuse before loading when the largest batch's cache cannot fit.
    longest = args.prompt_len + _new_tokens(max(args.batch), args.prompt_len, args.gen_len) + 1
    preflight(args.model, args.device, longest, args.cache, batch=max(args.batch), page_size=PAGE_SIZE)
    model = mixq.load_model(args.model, device=args.device, dtype=args.dtype)
    cfg = model.config
    res = run_bench(model, args.batch, args.prompt_len, args.gen_len, args.cache, args.seed, not args.eager)
    q = cfg.raw.get("quantization_config") or {}
    config = {"arch": arch_name(cfg), "bpw": q.get("bits"), "layers": cfg.num_hidden_layers, "model": args.model}
    res["config"] = config
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(format_table(res, args.model))
    if args.record:
        n = record(res, config, " ".join(["mixq"] + sys.argv[1:]))
        print(f"recorded {n} figures", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed, time to first token, peak VRAM, bandwidth use")
    p.add_argument("model", help="model directory")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="compute dtype: float16, bfloat16, float32 or auto")
    p.add_argument("--batch", type=_batches, default=[1, 4, 16, 64], help="decode batch sizes, e.g. 1,4,16,64")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--gen-len", type=int, default=128, help="timed decode steps per batch size")
    p.add_argument("--cache", default="fp16", choices=("fp16", "q8", "q4", "fp8"), help="KV cache format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--record", action="store_true", help="append the figures to bench/results.jsonl")
    p.set_defaults(func=cmd_bench)
