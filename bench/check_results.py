"""Check results lines against ../shared/docs/results-format.md, print the key figures, append them to the record.

    python -m bench.check_results OUT/results.jsonl [--expect copy_bandwidth,kernel_us]   # exit 1 on a bad line
    python -m bench.check_results OUT/results.jsonl --summary      # the key figures, most important first
    python -m bench.check_results OUT/results.jsonl --append bench/results.jsonl   # after a GPU run, once

`--append` refuses lines measured on `cpu` (the rehearsal's) and lines already in the record, so a GPU run's
figures are added once and a dry run's never.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

FIELDS = {"metric": str, "unit": str, "device": str, "date": str, "commit": str, "config": dict, "command": str}
CONFIG_KEYS = ("arch", "impl")
# The figures the GPU check prints first: (metric, config filter (a tuple: one of), label).
KEY_FIGURES = [
    ("copy_bandwidth", {}, "copy bandwidth"),
    ("expert_matmul_bw_fraction", {"tokens": 1}, "EXL2 GEMM 1 token, of copy bw"),
    ("kernel_us", {"op": "exl2_matmul", "tokens": 1, "impl": ("mixq", "fp16")}, "EXL2 GEMM 1 token"),
    ("moe_layer_bw_fraction", {}, "MoE layer, of copy bw"),
    ("moe_layer_vs_fp16", {}, "MoE layer vs fp16 loop"),
    ("decode_attention_bw_fraction", {}, "decode attention, of copy bw"),
    ("decode_tokens_per_s", {}, "decode"),
    ("prefill_tokens_per_s", {}, "prefill"),
    ("peak_vram_gib", {}, "peak VRAM"),
    ("interop_logits_rel_err", {}, "exllamav2 vs mixq logits"),
]
SHOWN = ("arch", "K", "N", "bpw", "tokens", "batch", "context", "cache", "impl", "cuda_graphs", "timing")


def problems(line: str) -> list[str]:
    """What is wrong with one results line (empty when it is well formed)."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        return [f"not JSON ({e})"]
    if not isinstance(d, dict):
        return ["not a JSON object"]
    out = [f"field {k!r} missing or not a {t.__name__}" for k, t in FIELDS.items() if not isinstance(d.get(k), t)]
    v = d.get("value")
    if isinstance(v, bool):
        pass
    elif not isinstance(v, (int, float)) or not math.isfinite(v):
        out.append(f"value {v!r} is not a finite number or a boolean")
    try:
        datetime.date.fromisoformat(str(d.get("date")))
    except ValueError:
        out.append(f"date {d.get('date')!r} is not an ISO date")
    cfg = d.get("config")
    if isinstance(cfg, dict):
        out += [f"config has no {k!r}" for k in CONFIG_KEYS if k not in cfg]
    return out


def load(path: str) -> tuple[list[dict], list[str]]:
    """(the well-formed lines, one message per bad line naming the file and line number)."""
    good, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            p = problems(line)
            if p:
                bad.append(f"{path}:{n}: {'; '.join(p)}")
            else:
                good.append(json.loads(line))
    return good, bad


def _cfg_text(c: dict) -> str:
    return " ".join(f"{k}={c[k]}" for k in SHOWN if k in c)


def _match(value, want) -> bool:
    return value in want if isinstance(want, tuple) else value == want


def summary(lines: list[dict], per_metric: int = 8) -> str:
    rows = []
    for metric, flt, label in KEY_FIGURES:
        hits = [
            x for x in lines if x["metric"] == metric and all(_match(x["config"].get(k), v) for k, v in flt.items())
        ]
        for x in hits[:per_metric]:
            rows.append(f"{label:<32} {x['value']!s:>10} {x['unit']:<8} {_cfg_text(x['config'])}")
    return "\n".join(rows) if rows else "(no key figures)"


def append_new(lines: list[dict], dest: str) -> int:
    """Append GPU-measured lines not already in `dest`; returns how many were added."""
    try:
        with open(dest, encoding="utf-8") as f:
            seen = {json.dumps(json.loads(x), sort_keys=True) for x in f if x.strip()}
    except FileNotFoundError:
        seen = set()
    new = [x for x in lines if x["device"] != "cpu" and json.dumps(x, sort_keys=True) not in seen]
    with open(dest, "a", encoding="utf-8") as f:
        for x in new:
            f.write(json.dumps(x) + "\n")
    return len(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a results.jsonl file")
    ap.add_argument("--expect", default="", help="comma-separated metrics that must appear at least once")
    ap.add_argument("--summary", action="store_true", help="print the key figures")
    ap.add_argument("--append", metavar="DEST", help="append the GPU-measured lines to DEST (bench/results.jsonl)")
    args = ap.parse_args()
    try:
        lines, bad = load(args.results)
    except OSError as e:
        sys.exit(f"check_results: cannot read {args.results}: {e.strerror}")
    missing = [m for m in args.expect.split(",") if m and m not in {x["metric"] for x in lines}]
    for b in bad:
        print(b, file=sys.stderr)
    if missing:
        print(f"{args.results}: no line for metric(s) {', '.join(missing)}", file=sys.stderr)
    if args.summary:
        print(summary(lines))
    if bad or missing:
        sys.exit(f"check_results: {len(bad)} bad line(s), {len(missing)} expected metric(s) missing")
    if args.append:
        print(f"appended {append_new(lines, args.append)} line(s) to {args.append}")
    else:
        print(f"{args.results}: {len(lines)} line(s), all well formed")


if __name__ == "__main__":
    main()
