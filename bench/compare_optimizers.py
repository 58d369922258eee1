"""mixq's knapsack DP vs exllamav2's simulated annealing on the same measurement.json.

For each target bpw: bits used, Σ error (the DP's objective) and the worst block error (the criterion
exllamav2 tunes its norm for), and wall time.

    python bench/compare_optimizers.py MEASUREMENT.json CONFIG_DIR [--bits 2.5,3,4,5,6] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results import append_result, model_id  # noqa: E402
from mixq.convert.optimize import Option, anneal, solve, total  # noqa: E402
from mixq.convert.pipeline import _weights  # noqa: E402
from mixq.model.config import MixtralConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("measurement")
    ap.add_argument("model", help="directory with the model's config.json")
    ap.add_argument("--bits", default="2.5,3,3.5,4,5,6")
    ap.add_argument("--anneal-runs", type=int, default=20, help="annealing runs per stage (exllamav2: 80)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    cfg = MixtralConfig.from_dir(args.model)
    with open(args.measurement, encoding="utf-8") as f:
        m = json.load(f)["measurement"]
    keys = [f"model.layers.{i}.{b}" for i in range(cfg.num_hidden_layers) for b in ("self_attn", "block_sparse_moe")]
    slots = [[Option(int(e["total_bits"]), 1 - float(e["accuracy"])) for e in m[k]] for k in keys]
    weights = cfg.num_hidden_layers * sum(_weights(cfg))
    print(f"{'bits':>5s} {'method':8s} {'bpw':>6s} {'sum err':>9s} {'max err':>9s} {'seconds':>8s}")
    model_sha = model_id(args.model)
    for bits in [float(b) for b in args.bits.split(",")]:
        budget = int(weights * bits)
        for name in ("dp", "anneal"):
            t = time.time()
            try:
                picks = solve(slots, budget) if name == "dp" else anneal(slots, budget, runs_per_stage=args.anneal_runs)
            except Exception as e:  # an unreachable target
                print(f"{bits:5.2f} {name:8s} {e}")
                continue
            used, s, mx = total(slots, picks)
            dt = time.time() - t
            print(f"{bits:5.2f} {name:8s} {used / weights:6.3f} {s:9.5f} {mx:9.5f} {dt:8.2f}")
            if args.record:
                cfg_rec = {"arch": os.path.basename(os.path.normpath(args.model)), "bpw": bits, "optimizer": name}
                cfg_rec["model_sha256"] = model_sha
                append_result("optimizer_sum_err", s, "fraction", cfg_rec)
                append_result("optimizer_max_err", mx, "fraction", cfg_rec)


if __name__ == "__main__":
    main()
