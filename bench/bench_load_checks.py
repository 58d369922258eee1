"""Cost of the load-time checks: the NaN/inf scan (`mixq.model.finite.count_nonfinite`) against reading the
same bytes from a safetensors file, on one Mixtral-8x7B expert's weights and on the embedded demo model.

    python bench/bench_load_checks.py [--record]

Reads are from the page cache (the file was just written), the fastest a load can go, so the scan's share of a
load from disk is at most the fraction printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results import append_result, model_id  # noqa: E402
from mixq.cli.demo import DEMO_DIR  # noqa: E402
from mixq.model.finite import count_nonfinite  # noqa: E402
from mixq.model.loader import load_model  # noqa: E402
from mixq.model.verify import verify_checkpoint  # noqa: E402

H, I = 4096, 14336  # Mixtral-8x7B hidden and expert widths
PARAMS_8X7B = 46.7e9  # all weights of Mixtral-8x7B


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    res: dict = {"threads": threads, "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        for dtype in (torch.bfloat16, torch.float16):
            g = torch.Generator().manual_seed(0)
            expert = {f"w{j}": (torch.randn(*s, generator=g) * 0.02).to(dtype) for j, s in
                      ((1, (I, H)), (2, (H, I)), (3, (I, H)))}  # fmt: skip
            nbytes = sum(t.numel() * t.element_size() for t in expert.values())
            path = os.path.join(d, "expert.safetensors")
            save_file(expert, path)
            with safe_open(path, "pt") as f:  # a read copies the bytes out of the page cache (get_tensor maps them)
                read = _median(lambda: [f.get_tensor(k).clone() for k in expert], args.repeats)  # noqa: B023
            scan = _median(lambda: [count_nonfinite(t) for t in expert.values()], args.repeats)  # noqa: B023
            name = str(dtype).replace("torch.", "")
            res[name] = {"bytes": nbytes, "scan_s": scan, "read_s": read, "scan_GBps": nbytes / scan / 1e9,
                         "read_GBps": nbytes / read / 1e9, "scan_over_read": scan / read}  # fmt: skip
            os.remove(path)
    load = _median(lambda: load_model(DEMO_DIR), args.repeats)
    check = _median(lambda: verify_checkpoint(DEMO_DIR, scan=True), args.repeats)
    scanned = verify_checkpoint(DEMO_DIR, scan=True).bytes_scanned
    res["demo"] = {"load_s": load, "check_s": check, "bytes": scanned}
    bf = res["bfloat16"]
    res["extrapolated_8x7b_bf16_scan_s"] = PARAMS_8X7B * 2 / (bf["scan_GBps"] * 1e9)
    print(json.dumps(res, indent=1))
    if args.record:
        for name in ("bfloat16", "float16"):
            r = res[name]
            cfg = {"arch": "mixtral-8x7b", "tensor": "one expert (w1, w2, w3: 176M weights)", "dtype": name,
                   "threads": threads, "load_average": round(res["load_average"], 1), "impl": "mixq"}  # fmt: skip
            append_result("nonfinite_scan_bandwidth", round(r["scan_GBps"], 2), "GB/s", cfg)
            append_result("nonfinite_scan_over_cached_read", round(r["scan_over_read"], 3), "fraction", cfg)
        cfg = {"arch": "demo", "model": model_id(DEMO_DIR), "threads": threads,
               "load_average": round(res["load_average"], 1), "impl": "mixq"}  # fmt: skip
        append_result("checkpoint_check_seconds", round(res["demo"]["check_s"], 4), "s", cfg)
        append_result("load_seconds", round(res["demo"]["load_s"], 4), "s", cfg)


if __name__ == "__main__":
    main()
