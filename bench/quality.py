"""Quality per bpw on the embedded model's held-out text: perplexity and KL divergence to fp16.

Rows: mixq EXL2 (measurement + optimizer), GPTQ with one uniform recipe (no measurement/optimizer),
round-to-nearest with the same recipe and scales, bitsandbytes NF4 (if its CPU or CUDA path works here),
and exllamav2's converter (GPU only, by bench/interop_exllamav2.py). Writes a markdown table and a PNG,
and with --record appends every figure to bench/results.jsonl.

    python bench/quality.py [--bits 2.5,3,3.5,4,5,6,8] [--quick] [--record]
    python bench/quality.py --impls mixq --bits 2.879,3.241 --merge --record   # mixq at the baselines' bpw
    python bench/quality.py --kv-cache /tmp/mixq-quality/mixq-4 --record     # cost of each KV cache format
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

import mixq  # noqa: E402
from bench.results import append_result, model_id  # noqa: E402
from mixq.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mixq.engine.evaluate import perplexity  # noqa: E402

# Uniform recipes "at matching bits" for the GPTQ and RTN baselines (group size 128, as most GPTQ models).
UNIFORM = {
    2.5: ".5:3b_128g/.5:2b_128g",
    3.0: "1:3b_128g",
    3.5: ".5:4b_128g/.5:3b_128g",
    4.0: "1:4b_128g",
    5.0: "1:5b_128g",
    6.0: "1:6b_128g",
    8.0: "1:8b_128g",
}
HERE = os.path.dirname(os.path.abspath(__file__))


def nf4_model(src: str, device: str):
    """The fp16 model with every expert and attention matrix replaced by its bitsandbytes NF4 round trip
    (blocksize 64, double quantization: what `load_in_4bit` gives; lm_head and router stay fp16)."""
    import bitsandbytes.functional as bnbf

    model = mixq.load_model(src, device=device)
    for name, mod in model.named_modules():
        if (
            name.startswith("model.layers")
            and hasattr(mod, "weight")
            and mod.weight.dim() == 2
            and "gate" not in name
            and "norm" not in name
        ):
            w = mod.weight.data.to(torch.float16)
            q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            mod.weight.data.copy_(bnbf.dequantize_4bit(q, state).to(mod.weight.dtype))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(os.path.dirname(mixq.__file__), "models", "demo"))
    ap.add_argument("--bits", default="2.5,3,3.5,4,5,6,8")
    ap.add_argument("--work", default="/tmp/mixq-quality")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="few calibration rows and evaluation windows (tests)")
    ap.add_argument("--record", action="store_true", help="append figures to bench/results.jsonl")
    ap.add_argument("--out", default=os.path.join(HERE, "quality"))
    ap.add_argument("--impls", default="fp16,mixq,gptq,rtn,nf4", help="rows to measure (fp16 is always the reference)")
    ap.add_argument("--merge", action="store_true", help="add to the rows of an earlier run's <out>.json")
    ap.add_argument("--measurement", help="measurement.json to reuse for the mixq rows (default: measure once)")
    ap.add_argument("--kv-cache", metavar="EXL2_DIR", help="instead: fp16 and EXL2_DIR through each KV cache format")
    args = ap.parse_args()
    impls = args.impls.split(",")
    torch.manual_seed(0)
    bits_list = [float(b) for b in args.bits.split(",")]
    tok = mixq.load_tokenizer(args.model)
    with open(os.path.join(args.model, "heldout.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read())
    windows = 2 if args.quick else None
    cal = dict(rows=4, measure_rows=2, length=128) if args.quick else {}
    ref = mixq.load_model(args.model, device=args.device)
    device = ref.device
    rows: list[dict] = []
    args.model_id = model_id(args.model)

    def record(impl: str, bits: float, model, bpw: float) -> None:
        r = perplexity(model, ids, 256, reference=ref, device=device, max_windows=windows)
        rows.append({"impl": impl, "bits": bits, "bpw": bpw, "ppl": r.ppl, "kl": r.kl})
        print(f"{impl:10s} {bits:4.1f} ({bpw:5.3f} bpw): ppl {r.ppl:9.4f}  KL {r.kl:.5f}", flush=True)
        if args.record:
            cfg = {"arch": "demo", "impl": impl, "bpw": round(bpw, 4), "target_bits": bits, "text": "heldout"}
            cfg["model_sha256"] = args.model_id
            append_result("ppl", r.ppl, "ppl", cfg)
            append_result("kl_to_fp16", r.kl, "nats", cfg)

    if args.kv_cache:
        return kv_cache_table(args, ref, ids, windows)
    if "fp16" in impls:
        record("fp16", 16.0, ref, 16.0)
    os.makedirs(args.work, exist_ok=True)
    measurement = args.measurement
    for bits in bits_list:
        for impl in [i for i in ("mixq", "gptq", "rtn") if i in impls]:
            out = os.path.join(args.work, f"{impl}-{bits:g}" + ("-quick" if args.quick else ""))
            if not os.path.exists(os.path.join(out, "config.json")):
                shutil.rmtree(out, ignore_errors=True)
                opts = ConvertOptions(bits=bits, device=args.device, **cal)
                if impl == "mixq":
                    opts.measurement = measurement
                else:
                    opts.uniform, opts.method = UNIFORM[bits], impl
                t = time.time()
                convert(args.model, out, opts, log=lambda *a: None)
                print(f"  converted {impl} {bits:g} in {time.time() - t:.1f} s", flush=True)
            if impl == "mixq" and measurement is None:
                measurement = os.path.join(out, "measurement.json")
            summary = json.load(open(os.path.join(out, "mixq_convert.json"), encoding="utf-8"))
            record(impl, bits, mixq.load_model(out, device=args.device), summary["bpw"])
        if bits == 4.0 and "nf4" in impls:
            try:
                record("nf4", 4.0, nf4_model(args.model, args.device), 4.127)
            except Exception as e:  # bitsandbytes missing or without a backend for this device
                print(f"nf4: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    if args.merge and os.path.exists(args.out + ".json"):
        with open(args.out + ".json", encoding="utf-8") as f:
            new = {(r["impl"], r["bits"]) for r in rows}
            rows = [r for r in json.load(f) if (r["impl"], r["bits"]) not in new] + rows
    write_report(sorted(rows, key=lambda r: (r["impl"] != "fp16", r["bpw"], r["impl"])), args.out)


def kv_cache_table(args, ref, ids: list[int], windows: int | None) -> None:
    """Accuracy cost of the KV cache formats: perplexity and KL to fp16 (plain forward) when every key and
    value goes through a paged cache of each format, for the fp16 model and an EXL2 conversion."""
    from mixq.engine.evaluate import through_cache

    exl2 = mixq.load_model(args.kv_cache, device=args.device)
    bpw = json.load(open(os.path.join(args.kv_cache, "mixq_convert.json"), encoding="utf-8"))["bpw"]
    lines = ["| weights | KV cache | perplexity | KL to fp16 (nats) |", "| --- | --- | --- | --- |"]
    for name, model, impl, w_bpw in (("fp16", ref, "fp16", 16.0), (f"EXL2 {bpw:.2f} bpw", exl2, "mixq", bpw)):
        for mode in ("fp16", "fp8", "q8", "q4"):
            r = perplexity(through_cache(model, mode), ids, 256, reference=ref, device=ref.device, max_windows=windows)
            lines.append(f"| {name} | {mode} | {r.ppl:.4f} | {r.kl:.5f} |")
            print(lines[-1], flush=True)
            if args.record:
                cfg = {"arch": "demo", "impl": impl, "bpw": round(w_bpw, 4), "cache": mode, "text": "heldout"}
                cfg["model_sha256"] = args.model_id
                append_result("ppl", r.ppl, "ppl", cfg)
                append_result("kl_to_fp16", r.kl, "nats", cfg)
    with open(args.out + "_kv.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_report(rows: list[dict], out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    lines = ["| impl | target bits | bpw | perplexity | KL to fp16 (nats) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['impl']} | {r['bits']:g} | {r['bpw']:.3f} | {r['ppl']:.4f} | {r['kl']:.5f} |" for r in rows]
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in sorted({r["impl"] for r in rows} - {"fp16"}):
        pts = sorted((r["bpw"], r["kl"]) for r in rows if r["impl"] == impl)
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder, overhead included)")
    ax.set_ylabel("mean KL divergence to fp16 (nats/token)")
    ax.set_title("Embedded demo model, held-out text")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    print(f"wrote {out}.md and {out}.png")


if __name__ == "__main__":
    main()
