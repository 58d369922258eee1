"""End to end on a synthetic EXL2 Mixtral built in memory on the device (random codes at the real shapes; on a
GPU the packed words are drawn there, so an 8x7B takes seconds where `mixq synth` to disk takes minutes).

Steps (`--steps`, in this order; each records its figures as `mixq bench --record` does, via run_bench):
- decode: prefill `--prompt-len` tokens (prefill_tokens_per_s), then decode tok/s at `--batch` in CUDA graphs;
- eager: the same decode without CUDA graphs (short prompts);
- vram: peak device memory with one sequence filling `--context` tokens, per `--vram-cache` format.

    python -m bench.bench_e2e --arch mixtral-8x7b --bits 4.0                      # all steps
    python -m bench.bench_e2e --arch mixtral-8x22b --bits 4.0 --steps vram --context 65536 --vram-cache q4
    python -m bench.bench_e2e --tiny          # a 2-layer model of hidden 256: runs on CPU (the rehearsal)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_kernels import int_list  # noqa: E402
from bench.common import bench_device, on_gpu  # noqa: E402
from bench.common import record as record_one  # noqa: E402
from mixq.cli.bench import PREFILL_CHUNK, format_table, record, run_bench  # noqa: E402
from mixq.kernels import ops  # noqa: E402
from mixq.model.archs import arch_config, arch_name  # noqa: E402
from mixq.synthetic.exl2_checkpoint import synth_model  # noqa: E402

STEPS = ("decode", "eager", "vram")


def tiny_config(layers: int = 2):
    """Mixtral's structure at toy size (head_dim 32, which the decode kernel has)."""
    return dataclasses.replace(
        arch_config("mixtral-8x7b", layers),
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=4096,
    )


def free_device() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()


def fill_prompt(context: int, gen_len: int) -> int:
    """A prompt length such that prompt + decoded tokens (run_bench's slack included) ends at `context`."""
    return context - gen_len - -(-context // PREFILL_CHUNK) - 6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mixtral-8x7b")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (figures say so)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    ap.add_argument("--batch", type=int_list, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=2048, help="prefill length of the decode step")
    ap.add_argument("--gen-len", type=int, default=32, help="timed decode steps per batch size")
    ap.add_argument("--context", type=int, default=32768, help="tokens in the cache for the vram step")
    ap.add_argument("--vram-cache", default="q8,q4", help="cache formats of the vram step")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="2 layers of hidden 256, short runs; CPU allowed")
    args = ap.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        sys.exit(f"bench_e2e: unknown step(s) {', '.join(bad)}; choose from {', '.join(STEPS)}")
    if not args.tiny and not (on_gpu() and ops.cuda_ops_available()):
        sys.exit("bench_e2e: needs a CUDA GPU and mixq._C (--tiny runs on CPU); the reference path would be timed")
    if args.tiny:
        cfg, arch = tiny_config(), "tiny"
        args.batch, args.prompt_len, args.gen_len, args.context = [1, 2], 32, 4, 256
    else:
        cfg = arch_config(args.arch, args.layers)
        arch = arch_name(cfg)
    dev = bench_device()
    try:
        run_steps(args, cfg, arch, steps, dev)
    except torch.OutOfMemoryError as e:  # a finding, not a crash: say where and how much was held
        held = torch.cuda.memory_allocated() / 2**30 if on_gpu() else 0.0
        sys.exit(f"bench_e2e: out of device memory ({held:.1f} GiB allocated): {str(e).splitlines()[0]}")


def run_steps(args, cfg, arch: str, steps: list[str], dev: torch.device) -> None:
    cmd = " ".join(["python -m bench.bench_e2e"] + sys.argv[1:])
    t = time.perf_counter()
    model = synth_model(cfg, args.bits, dev, dtype=torch.float16)
    if on_gpu():
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    print(f"built {arch} ({cfg.num_hidden_layers} layers, {args.bits} bpw) on {dev} in {build_s:.1f} s", flush=True)
    config = {"arch": arch, "bpw": args.bits, "layers": cfg.num_hidden_layers, "model": "synthetic in memory"}
    if not args.no_record:
        record_one("synth_build_seconds", round(build_s, 2), "s", {**config, "impl": "mixq", "on": dev.type}, cmd)

    failed = []

    def run(batches: list[int], prompt_len: int, gen_len: int, cache: str, graphs: bool, title: str) -> None:
        """One run_bench; a Python-level failure (a graph capture, an OOM) is printed and the next step still runs."""
        free_device()
        t0 = time.perf_counter()
        try:
            res = run_bench(model, batches, prompt_len, gen_len, cache, cuda_graphs=graphs)
        except Exception:  # noqa: BLE001 - the first GPU run: report every step's failure, keep the others
            traceback.print_exc()
            print(f"bench_e2e: {arch} {title}: FAILED", flush=True)
            failed.append(title)
            return
        print(format_table(res, f"{arch} {title}") + f"\n({time.perf_counter() - t0:.1f} s)", flush=True)
        if not args.no_record:
            record(res, config, cmd)

    if "decode" in steps:
        run(args.batch, args.prompt_len, args.gen_len, "fp16", True, "decode, CUDA graphs")
    if "eager" in steps:
        run(args.batch, min(args.prompt_len, 128), max(4, args.gen_len // 2), "fp16", False, "decode, eager")
    if "vram" in steps:
        context = min(args.context, cfg.max_position_embeddings)
        for cache in [c for c in args.vram_cache.split(",") if c]:
            run([1], fill_prompt(context, 4), 4, cache, True, f"{context} context, {cache} cache")
    if failed:
        sys.exit(f"bench_e2e: {len(failed)} step(s) failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
