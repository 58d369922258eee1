"""Benchmark of a whole MoE layer (router + top-2 routing + every active expert's w1/w3/w2) at Mixtral shapes.

Implementations, all from the same router weights and inputs:
- mixq: `mixq.kernels.moe.moe_forward` (grouped EXL2 kernels; the dense path above 32 rows per expert);
- loop-part1: the per-expert loop over `exl2_matmul` (part 1's kernel per matrix), as SparseMoE did;
- dequant+fp16: `moe_forward(..., dense_rows_per_expert=0)`: dequantize each active expert, torch.matmul;
- fp16: dense fp16 weights, per-expert torch.matmul loop (the baseline of `moe_layer_vs_fp16`);
- fp16-grouped: bf16 `torch._grouped_mm` over expert-sorted tokens, when this torch has it.
Timed batches read >= 2x L2 of distinct weight copies where memory allows and replay as a CUDA graph when the
path is capturable (bench/common.py); the loops sync on the host and are timed eagerly (marked "eager").
Bandwidth fraction: bytes of the experts the step really touches (+ activations) / time / copy bandwidth.
Records kernel_us (op moe_layer), moe_layer_bw_fraction and moe_layer_vs_fp16 in bench/results.jsonl.

    python -m bench.bench_moe            # full sweep (H100: several minutes)
    python -m bench.bench_moe --quick    # 8x7b, 2.5 and 4 bpw, 4 token counts
    python -m bench.bench_moe --arch mixtral-8x7b,mixtral-8x22b --bpw 4.0 --tokens 1,8,64,1024   # gpu_check.sh
    python -m bench.bench_moe --tiny     # hidden 256, experts of 512: runs on CPU too (the rehearsal)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_kernels import float_list, int_list, pick_recipe, random_exl2_cuda, rel_err  # noqa: E402
from bench.common import bench_device, copies_needed, start_gpu_bench, time_batch  # noqa: E402
from mixq.kernels import moe, ops  # noqa: E402
from mixq.kernels.moe import route  # noqa: E402
from mixq.model.exl2_linear import Exl2Linear  # noqa: E402
from mixq.model.mixtral import Expert  # noqa: E402

ARCHS = {"mixtral-8x7b": (4096, 14336), "mixtral-8x22b": (6144, 16384), "tiny": (256, 512)}
E, TOP_K = 8, 2
BPW = [2.5, 3.0, 4.0, 5.0, 6.0]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096]
EAGER_ONLY = ("loop-part1", "dequant+fp16", "fp16", "fp16-grouped")


def build_layer(H: int, inter: int, target: float, gen: torch.Generator):
    """Eight random EXL2 experts (on the GPU) with exllamav2 MLP recipes near `target` bpw."""
    q13, q2 = pick_recipe(H, inter, target), pick_recipe(inter, H, target)
    experts = []
    for _ in range(E):
        t1, t3 = random_exl2_cuda(H, inter, q13, gen), random_exl2_cuda(H, inter, q13, gen)
        t2 = random_exl2_cuda(inter, H, q2, gen)
        experts.append(Expert(Exl2Linear(t1), Exl2Linear(t2), Exl2Linear(t3)))
    p = moe.prepare_moe(experts, gen.device)
    bits = 2 * q13.total_bits(H, inter) + q2.total_bits(inter, H)
    return p, bits / (3 * H * inter), f"{q13} | {q2}"


def expert_bytes(p: moe.PreparedMoE) -> int:
    return sum(
        t[0].numel() * t.element_size()
        for s in (p.w1, p.w3, p.w2)
        for t in (s.qweight, s.qscale, s.scale_max, s.tile_group)
    )


def loop_part1(x, router, p: moe.PreparedMoE):
    w, ids = route(F.linear(x, router), TOP_K)
    xk = x[:, p.x_perm] if p.x_perm is not None else x
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        xe = xk[tok]
        h = F.silu(ops.exl2_matmul(xe, p.w1.expert(e))) * ops.exl2_matmul(xe, p.w3.expert(e))
        out.index_add_(0, tok, ops.exl2_matmul(h, p.w2.expert(e)) * w[tok, slot, None].to(x.dtype))
    return out


def fp16_loop(x, router, W):
    w, ids = route(F.linear(x, router), TOP_K)
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        xe = x[tok]
        h = F.silu(xe @ W[0][e]) * (xe @ W[1][e])
        out.index_add_(0, tok, (h @ W[2][e]) * w[tok, slot, None].to(x.dtype))
    return out


def fp16_grouped(x, router, Wb):
    """bf16 torch._grouped_mm over tokens sorted by expert (device offsets, no host sync)."""
    w, ids = route(F.linear(x, router), TOP_K)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    xs = x.to(torch.bfloat16)[order // TOP_K]
    gu = torch._grouped_mm(xs, Wb[0], offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm((F.silu(g) * u).contiguous(), Wb[1], offs=offs)
    rows = torch.empty_like(y)
    rows[order] = y
    return (rows.view(-1, TOP_K, y.shape[-1]).float() * w[..., None]).sum(1).to(x.dtype)


def summarize(path: str) -> None:
    import json

    lines = [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]
    us, frac = {}, {}
    for x in lines:
        c = x.get("config", {})
        if x["metric"] == "kernel_us" and c.get("op") == "moe_layer":
            us[(c["arch"], c.get("bpw", 16), c["tokens"], c["impl"])] = x["value"]
        if x["metric"] == "moe_layer_bw_fraction":
            frac[(c["arch"], c["bpw"], c["tokens"])] = x["value"]
    print("MoE layer: mixq us (% copy bw) / best other us, per token count")
    keys = sorted({(k[0], k[1]) for k in us if k[3] == "mixq"})
    toks = sorted({k[2] for k in us})
    print(f"{'arch':>14} {'bpw':>5} " + " ".join(f"{'t=' + str(t):>15}" for t in toks))
    for arch, b in keys:
        cells = []
        for t in toks:
            m = us.get((arch, b, t, "mixq"))
            others = [v for (a, bb, tt, i), v in us.items() if a == arch and tt == t and i != "mixq" and bb in (b, 16)]
            fr = frac.get((arch, b, t))
            cell = "-" if m is None else f"{m:.0f}" + (f"({100 * fr:.0f}%)" if fr is not None else "")
            cells.append(f"{cell + '/' + (f'{min(others):.0f}' if others else '-'):>15}")
        print(f"{arch:>14} {b:>5.2f} " + " ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", metavar="JSONL", help="only print a compact table from these results lines")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--arch", help="comma-separated: mixtral-8x7b, mixtral-8x22b")
    ap.add_argument("--bpw", type=float_list, help="target bits per weight, e.g. 4.0")
    ap.add_argument("--tokens", type=int_list, help="token counts, e.g. 1,8,64,1024")
    ap.add_argument("--tiny", action="store_true", help="hidden 256, experts of 512; CPU allowed (rehearsal)")
    args = ap.parse_args()
    if args.summary:
        summarize(args.summary)
        return
    rec, copy_bw = start_gpu_bench("bench_moe", args.quick, args.no_record, args.tiny)
    archs, bpws, tokens = ["mixtral-8x7b", "mixtral-8x22b"], BPW, TOKENS
    if args.quick:
        archs, bpws, tokens = ["mixtral-8x7b"], [2.5, 4.0], [1, 4, 16, 256]
    archs = ["tiny"] if args.tiny else args.arch.split(",") if args.arch else archs
    bpws, tokens = args.bpw or bpws, args.tokens or tokens
    dev = bench_device()
    gen = torch.Generator(device=dev).manual_seed(0)
    has_grouped = hasattr(torch, "_grouped_mm") and dev.type == "cuda"
    for arch in archs:
        H, inter = ARCHS[arch]
        router = torch.randn(E, H, device=dev, generator=gen).half() * 0.05
        W = [
            torch.randn(E, a, b, device=dev, generator=gen).half() * 0.02
            for a, b in ((H, inter), (H, inter), (inter, H))
        ]
        Wb = None
        if has_grouped:
            Wb = (torch.cat([W[0], W[1]], 2).bfloat16(), W[2].bfloat16())
        fp16_us: dict[int, float] = {}
        for target in bpws:
            p, bpw, recipe = build_layer(H, inter, target, gen)
            per_expert = expert_bytes(p)
            for T in tokens:
                ncopy = min(4, copies_needed(per_expert * min(E, 2 * T), min_calls=2))
                xs = [torch.randn(T, H, device=dev, generator=gen).half() for _ in range(ncopy)]
                active = sum(int(torch.unique(route(F.linear(x, router), TOP_K)[1]).numel()) for x in xs) / ncopy
                io = 2 * T * H * 2
                y = moe.moe_forward(xs[0], router, p, TOP_K)
                err = rel_err(y, moe.moe_forward_ref(xs[0].float(), router.float(), p, TOP_K))
                impls = {
                    "mixq": [lambda x=x, r=router, p=p: moe.moe_forward(x, r, p, TOP_K) for x in xs],
                    "loop-part1": [lambda x=x, r=router, p=p: loop_part1(x, r, p) for x in xs],
                    "dequant+fp16": [
                        lambda x=x, r=router, p=p: moe.moe_forward(x, r, p, TOP_K, dense_rows_per_expert=0)
                        for x in xs
                    ],
                }
                if T not in fp16_us:
                    impls["fp16"] = [lambda x=x, r=router, W=W: fp16_loop(x, r, W) for x in xs]
                    if Wb is not None:
                        impls["fp16-grouped"] = [lambda x=x, r=router, Wb=Wb: fp16_grouped(x, r, Wb) for x in xs]
                res = {}
                for impl, calls in impls.items():
                    graphable = impl not in EAGER_ONLY and not (impl == "mixq" and T * TOP_K > 32 * E)
                    try:
                        us, method = time_batch(calls, reps=args.reps, use_graph=graphable)
                    except Exception as e:  # noqa: BLE001 - e.g. _grouped_mm unsupported here
                        print(f"  {impl}: skipped ({type(e).__name__}: {str(e)[:80]})")
                        continue
                    res[impl] = us
                    dense = impl.startswith("fp16")
                    cfg = {"arch": arch, "op": "moe_layer", "experts": E, "top_k": TOP_K, "tokens": T, "impl": impl}
                    cfg.update(
                        {"timing": method} if dense else {"bpw": round(bpw, 3), "recipe": recipe, "timing": method}
                    )
                    rec("kernel_us", round(us, 2), "us", cfg)
                    if impl == "fp16":
                        fp16_us[T] = us
                m = res.get("mixq")
                if m is not None:
                    frac = (active * per_expert + io) / (m * 1e-6) / 1e9 / copy_bw
                    cfg = {"arch": arch, "bpw": round(bpw, 3), "recipe": recipe, "tokens": T, "impl": "mixq"}
                    rec("moe_layer_bw_fraction", round(frac, 4), "fraction", {**cfg, "active_experts": active})
                    if T in fp16_us:
                        rec("moe_layer_vs_fp16", round(fp16_us[T] / m, 3), "ratio", {**cfg, "baseline": "fp16 loop"})
                    print(
                        f"{arch} {bpw:.2f} bpw T={T:5d}: "
                        + "  ".join(f"{k}={v:.0f}us" for k, v in res.items())
                        + f"  ({100 * frac:.0f}% copy bw, {active:.1f} experts, err {err:.1e})",
                        flush=True,
                    )
            p = impls = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        W = Wb = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
