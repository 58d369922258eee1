"""Conversion cost at real Mixtral layer shapes: seconds per layer, peak VRAM and host memory.

Writes a synthetic fp16 checkpoint with Mixtral 8x7B's (or 8x22B's) layer shapes and a few layers,
converts it with `mixq convert`, and reports the per-layer time of each pass. exllamav2 reports about
20 GB of VRAM to convert 8x7B.

    python bench/bench_convert.py [--arch mixtral-8x7b] [--layers 2] [--device cuda] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results import append_result  # noqa: E402
from mixq.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mixq.model.config import MixtralConfig  # noqa: E402
from mixq.synthetic.hf_checkpoint import write_random_checkpoint  # noqa: E402

ARCHS = {
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "mixtral-8x22b": dict(hidden_size=6144, intermediate_size=16384, num_attention_heads=48, num_key_value_heads=8),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mixtral-8x7b", choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="/tmp/mixq-bench-convert")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    cfg = MixtralConfig(vocab_size=32000, num_hidden_layers=args.layers, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=32768, rope_theta=1e6, **ARCHS[args.arch])
    src, out = os.path.join(args.work, "src"), os.path.join(args.work, "out")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".work", ignore_errors=True)
    if not os.path.exists(os.path.join(src, "config.json")):
        t = time.time()
        write_random_checkpoint(src, cfg, seed=0, dtype=torch.float16, shard_layers=1)
        print(f"wrote synthetic {args.arch} ({args.layers} layers) in {time.time() - t:.0f} s", flush=True)
    t = time.time()
    summary = convert(src, out, ConvertOptions(bits=args.bits, rows=args.rows, measure_rows=min(args.rows, 16),
                                               length=args.length, device=args.device))
    total = time.time() - t
    per_layer = total / args.layers
    print(json.dumps({"arch": args.arch, "layers": args.layers, "seconds": round(total, 1),
                      "seconds_per_layer": round(per_layer, 1), "peak_vram_gib": summary["peak_vram_gib"],
                      "peak_rss_gib": summary["peak_rss_gib"]}))
    if args.record:
        cfg_rec = {"arch": args.arch, "bpw": args.bits, "layers": args.layers, "rows": args.rows,
                   "length": args.length, "impl": "mixq"}
        append_result("convert_seconds_per_layer", round(per_layer, 2), "s", cfg_rec)
        append_result("convert_peak_rss_gib", summary["peak_rss_gib"], "GiB", cfg_rec)
        if summary["peak_vram_gib"]:
            append_result("convert_peak_vram_gib", summary["peak_vram_gib"], "GiB", cfg_rec)


if __name__ == "__main__":
    main()
