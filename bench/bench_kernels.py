"""Benchmark of the EXL2 kernels against fp16 torch.matmul, dequantize+matmul and (if importable) exllamav2.

Measures the device copy bandwidth first, then per (K x N, recipe, tokens): µs per call, GB/s of the bytes the
op must move (weights + x + y), % of the copy bandwidth, TFLOP/s. Each timed batch reads its own weight copies
(>= 2x L2) and is replayed as a CUDA graph (bench/common.py). Figures go to bench/results.jsonl
(copy_bandwidth, expert_matmul_bw_fraction, kernel_us) and a table is printed last.

    python -m bench.bench_kernels            # full sweep (H100: a few minutes)
    python -m bench.bench_kernels --quick    # two shapes, two recipes
    python -m bench.bench_kernels --arch mixtral-8x7b,mixtral-8x22b --bpw 4.0 --tokens 1,4,16   # gpu_check.sh
    python -m bench.bench_kernels --tiny     # 256 x 512, runs on CPU too (the rehearsal; timings meaningless)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import bench_device, copies_needed, device_name, start_gpu_bench, time_batch  # noqa: E402
from mixq.exl2.format import Exl2Tensors, make_exl2  # noqa: E402
from mixq.exl2.layout import PreparedExl2, prepare_exl2  # noqa: E402
from mixq.exl2.qparams import QPARAMS_MLP, QParams  # noqa: E402
from mixq.exl2.reference import dequantize  # noqa: E402
from mixq.kernels import ops  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024), (6144, 16384), (16384, 6144)]
EXPERT_SHAPES = {
    (4096, 14336): "mixtral-8x7b",
    (14336, 4096): "mixtral-8x7b",
    (6144, 16384): "mixtral-8x22b",
    (16384, 6144): "mixtral-8x22b",
}
BPW = [2.5, 3.0, 4.0, 5.0, 6.0]
TOKENS = [1, 2, 4, 8, 16, 32]
SWITCH_TOKENS = [8, 16, 32, 48, 64, 96, 128, 192, 256, 512]
ARCH_SHAPES = {"mixtral-8x7b": [(4096, 14336), (14336, 4096)], "mixtral-8x22b": [(6144, 16384), (16384, 6144)]}
TINY_SHAPES = [(256, 512), (512, 256)]


def int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def float_list(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def recipe_pool() -> list[QParams]:
    """exllamav2's expert (MLP) recipes: the width mixes experts really get."""
    seen: dict[str, QParams] = {}
    for row in QPARAMS_MLP:
        for q in row.values():
            seen[str(q)] = q
    return list(seen.values())


def pick_recipe(K: int, N: int, target: float) -> QParams:
    return min(recipe_pool(), key=lambda q: (abs(q.bpw(K, N) - target), len(q.bits)))


def random_exl2_cuda(K: int, N: int, qp: QParams, gen: torch.Generator) -> Exl2Tensors:
    """Like mixq.synthetic.exl2_layer.random_exl2 but drawn and packed on the generator's device (the GPU: fast
    at 16384 x 6144)."""
    dev = gen.device
    gb = qp.groups(K)
    q = torch.cat([torch.randint(0, 1 << b, (r, N), device=dev, generator=gen, dtype=torch.int32) for b, r in gb])
    codes = torch.randint(0, 16, (len(gb), N), device=dev, generator=gen, dtype=torch.int32)
    smax = torch.tensor([0.02 * math.sqrt(3) / (1 << (b - 1)) / 0.4 for b, _ in gb], device=dev)
    inv = torch.randperm(K, device=dev, generator=gen)
    return make_exl2(q, gb, codes, smax, inv)


def clone_prepared(p: PreparedExl2) -> PreparedExl2:
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()}
    return PreparedExl2(**kw)


def exllamav2_matmul(t: Exl2Tensors):
    """A callable x -> y over exllamav2's kernel for this matrix, or the reason it is unavailable."""
    try:
        from exllamav2.ext import exllamav2_ext as ext_c
        from exllamav2.ext import make_q_matrix
    except Exception as e:  # noqa: BLE001 - any import failure means "no peer"
        return None, f"exllamav2 not importable: {type(e).__name__}: {e}"
    try:
        w = {
            "q_weight": t.q_weight.clone(),
            "q_invperm": t.q_invperm.clone(),
            "q_perm": torch.argsort(t.q_invperm.long()).int(),
            "q_scale": t.q_scale.clone(),
            "q_scale_max": t.q_scale_max.clone(),  # scaled in place by make_q_matrix
            "q_groups": t.q_groups.clone(),
        }
        temp_dq = torch.empty(t.in_features * t.out_features + 128, dtype=torch.float16, device="cuda")
        handle = make_q_matrix(w, temp_dq)
        N = t.out_features

        def run(x):
            y = torch.empty(x.shape[0], N, dtype=torch.float16, device="cuda")
            ext_c.gemm_half_q_half(x, handle, y, False)
            return y

        run._keep = (w, temp_dq, handle)  # type: ignore[attr-defined]
        return run, ""
    except Exception as e:  # noqa: BLE001
        return None, f"exllamav2 make_q_matrix failed: {type(e).__name__}: {e}"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def summarize(path: str) -> None:
    """Compact table from results.jsonl lines: per expert shape and bpw, mixq µs (% of copy bw) vs fp16 µs."""
    import json

    lines = [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]
    bw = [x["value"] for x in lines if x["metric"] == "copy_bandwidth"]
    print(f"copy bandwidth: {bw[-1] if bw else '?'} GB/s")
    us = {}
    for x in lines:
        c = x.get("config", {})
        if x["metric"] == "kernel_us" and c.get("op") == "exl2_matmul":
            us[(c["K"], c["N"], c["bpw"], c["tokens"], c["impl"])] = x["value"]
    frac = {}
    for x in lines:
        c = x.get("config", {})
        if x["metric"] == "expert_matmul_bw_fraction":
            frac[(c["K"], c["N"], c["bpw"], c["tokens"])] = x["value"]
    keys = sorted({k[:3] for k in us})
    toks = sorted({k[3] for k in us})
    print("mixq us (%copy bw) / fp16 us, per token count")
    print(f"{'KxN':>11} {'bpw':>5} " + " ".join(f"{'t=' + str(t):>17}" for t in toks))
    for K, N, b in keys:
        cells = []
        for t in toks:
            m, f = us.get((K, N, b, t, "mixq")), us.get((K, N, b, t, "fp16"))
            fr = frac.get((K, N, b, t))
            cell = "-" if m is None else f"{m:.0f}" + (f"({100 * fr:.0f}%)" if fr is not None else "")
            cells.append(f"{cell + '/' + ('-' if f is None else f'{f:.0f}'):>17}")
        print(f"{K:>5}x{N:<5} {b:>5.2f} " + " ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", metavar="JSONL", help="only print a compact table from these results lines")
    ap.add_argument("--quick", action="store_true", help="two shapes, two recipes, fewer token counts")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results.jsonl")
    ap.add_argument("--no-exllamav2", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--arch", help="only these models' expert shapes, e.g. mixtral-8x7b,mixtral-8x22b")
    ap.add_argument("--bpw", type=float_list, help="target bits per weight, e.g. 4.0 or 2.5,4.0")
    ap.add_argument("--tokens", type=int_list, help="token counts, e.g. 1,4,16")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, CPU allowed (rehearsal; no crossover sweep)")
    args = ap.parse_args()
    if args.summary:
        summarize(args.summary)
        return
    rec, copy_bw = start_gpu_bench("bench_kernels", args.quick, args.no_record, args.tiny)
    shapes, bpws, tokens = SHAPES, BPW, TOKENS
    if args.quick:
        shapes, bpws, tokens = [(4096, 14336), (14336, 4096)], [2.5, 4.0], [1, 4, 16]
    if args.arch:
        shapes = [s for a in args.arch.split(",") for s in ARCH_SHAPES[a]]
    if args.tiny:  # recorded like expert shapes, so the rehearsal writes every metric the GPU run does
        shapes = TINY_SHAPES
        EXPERT_SHAPES.update({s: "tiny" for s in TINY_SHAPES})
    bpws, tokens = args.bpw or bpws, args.tokens or tokens
    dev = device_name()
    gen = torch.Generator(device=bench_device()).manual_seed(0)

    rows = []
    peer_note = ""
    for K, N in shapes:
        dense = [
            torch.randn(K, N, device=gen.device, generator=gen).half() * 0.02
            for _ in range(copies_needed(K * N * 2, min_calls=4, max_calls=16))
        ]
        for target in bpws:
            qp = pick_recipe(K, N, target)
            bpw = qp.bpw(K, N)
            t = random_exl2_cuda(K, N, qp, gen)
            p = prepare_exl2(t, gen.device)
            ncopy = copies_needed(p.weight_bytes())
            preps = [p] + [clone_prepared(p) for _ in range(ncopy - 1)]
            peer = None
            if not args.no_exllamav2 and gen.device.type == "cuda":
                peer, why = exllamav2_matmul(t)
                peer_note = peer_note or why
            w_ref = dequantize(t).float()
            for m in tokens:
                x = torch.randn(m, K, device=gen.device, generator=gen).half()
                err = rel_err(ops.exl2_gemm(x, p), x.float() @ w_ref)
                io = 2 * m * (K + N)
                impls = {
                    "mixq": ([lambda q=q, x=x: ops.exl2_gemm(x, q) for q in preps], p.weight_bytes()),
                    "dequant+mm": (
                        [lambda q=q, x=x: ops.exl2_matmul(x, q, dense_threshold=0) for q in preps],
                        p.weight_bytes(),
                    ),
                    "fp16": ([lambda w=w, x=x: torch.matmul(x, w) for w in dense], K * N * 2),
                }
                if peer is not None:
                    impls["exllamav2"] = ([lambda f=peer, x=x: f(x)] * 4, p.weight_bytes())  # one copy: L2-warm, marked
                for impl, (calls, wbytes) in impls.items():
                    us, method = time_batch(calls, reps=args.reps)
                    gbs = (wbytes + io) / (us * 1e-6) / 1e9
                    row = dict(
                        K=K,
                        N=N,
                        recipe=str(qp),
                        bpw=round(bpw, 3),
                        tokens=m,
                        impl=impl,
                        us=us,
                        gbs=gbs,
                        frac=gbs / copy_bw,
                        tflops=2 * m * K * N / (us * 1e-6) / 1e12,
                        method=method,
                        err=err if impl == "mixq" else float("nan"),
                    )
                    rows.append(row)
                    cfg = {
                        "arch": EXPERT_SHAPES.get((K, N), "matrix"),
                        "op": "exl2_matmul",
                        "K": K,
                        "N": N,
                        "bpw": round(bpw, 3),
                        "recipe": str(qp),
                        "tokens": m,
                        "impl": impl,
                        "timing": method,
                    }
                    rec("kernel_us", round(us, 2), "us", cfg)
                    if impl == "mixq" and (K, N) in EXPERT_SHAPES:
                        rec("expert_matmul_bw_fraction", round(row["frac"], 4), "fraction", cfg)
                print(
                    f"{K}x{N} {str(qp):40s} {bpw:.2f} bpw  m={m:3d}  "
                    + "  ".join(f"{r['impl']}={r['us']:.1f}us" for r in rows[-len(impls) :])
                    + f"  err={err:.1e}",
                    flush=True,
                )
            del preps, p, t, w_ref
        del dense
        if gen.device.type == "cuda":
            torch.cuda.empty_cache()

    # Where dequantize + cuBLAS overtakes the fused kernel (sets DEFAULT_DENSE_THRESHOLD).
    switch_rows = []
    if not (args.quick or args.tiny or args.arch or args.bpw or args.tokens):
        K, N = 4096, 14336
        qp = pick_recipe(K, N, 4.0)
        t = random_exl2_cuda(K, N, qp, gen)
        preps = [prepare_exl2(t, "cuda")]
        preps += [clone_prepared(preps[0]) for _ in range(copies_needed(preps[0].weight_bytes()) - 1)]
        crossover = None
        for m in SWITCH_TOKENS:
            x = torch.randn(m, K, device="cuda", generator=gen).half()
            k_us, _ = time_batch([lambda q=q, x=x: ops.exl2_gemm(x, q) for q in preps], reps=args.reps)
            d_us, _ = time_batch(
                [lambda q=q, x=x: ops.exl2_matmul(x, q, dense_threshold=0) for q in preps], reps=args.reps
            )
            switch_rows.append((m, k_us, d_us))
            if crossover is None and d_us < k_us:
                crossover = m
        if crossover is not None:
            rec(
                "exl2_dense_switch_tokens",
                crossover,
                "tokens",
                {"arch": "mixtral-8x7b", "K": K, "N": N, "bpw": round(qp.bpw(K, N), 3), "impl": "mixq"},
            )

    print("\n== EXL2 matmul (µs per call; GB/s of weights+io; % of copy bandwidth) ==")
    if peer_note:
        print(f"note: {peer_note}")
    print(f"copy bandwidth {copy_bw:.0f} GB/s on {dev}; exllamav2 rows reuse one weight copy (L2-warm)")
    hdr = f"{'KxN':>11} {'bpw':>5} {'tok':>4} {'impl':>10} {'us':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'err':>8}"
    print(hdr)
    for r in rows:
        err = "" if math.isnan(r["err"]) else f"{r['err']:.1e}"
        print(
            f"{r['K']:>5}x{r['N']:<5} {r['bpw']:>5.2f} {r['tokens']:>4} {r['impl']:>10} {r['us']:>8.1f} "
            f"{r['gbs']:>7.0f} {100 * r['frac']:>5.0f}% {r['tflops']:>8.2f} {err:>8}"
        )
    if switch_rows:
        print("\n== kernel vs dequant+matmul, 4096x14336 ~4 bpw ==")
        for m, k_us, d_us in switch_rows:
            print(f"tokens {m:>4}: kernel {k_us:8.1f} us  dequant+mm {d_us:8.1f} us")


if __name__ == "__main__":
    main()
