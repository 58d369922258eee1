"""Launch each of mixq's kernels once, at small shapes, and check it against its PyTorch reference: the target of
`compute-sanitizer --tool memcheck|racecheck` (few launches, so the tools finish in seconds) and, at Mixtral
shapes, of `ncu` (the 1-token EXL2 GEMM and the 1-token MoE layer).

Kernels reached: exl2_gemm (1 and 16 tokens, split-K forced too, hence its fix-up; bf16 in and out), the grouped
q/k/v launch (exl2_gemm_group), exl2_dequant, topk_softmax, moe_router, moe_align, the grouped MoE kernels in
decode and aligned (prefill) modes (moe_gate_up, moe_down with their fix-up epilogues), moe_finalize (the dense
path), rms_norm, add_rms_norm, rope_qk, paged_cache_write (plain and with RoPE) and paged_decode_attention per
cache format over several partitions (hence its fix-up). Runs on the GPU, under the CPU emulation (MIXQ_CUDA_EMU),
or without kernels on the references alone (a plumbing check: it says so).

    python bench/launch_kernels.py                        # every kernel once, small shapes
    python bench/launch_kernels.py --size mixtral --only gemm1,moe1    # the ncu targets
Exit status 1 when a kernel disagrees with its reference.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_kernels import pick_recipe, random_exl2_cuda, rel_err  # noqa: E402
from bench.bench_moe import build_layer  # noqa: E402
from bench.common import bench_device, sync  # noqa: E402
from mixq.exl2.layout import prepare_exl2  # noqa: E402
from mixq.kernels import layers, moe, ops  # noqa: E402
from mixq.kernels import paged_attention as pa  # noqa: E402
from mixq.kernels.kv_quant import GROUP, code_dtype, code_width  # noqa: E402

SIZES = {  # (K, N) of the GEMM, (hidden, intermediate) of the MoE layer, attention context
    "small": ((256, 512), (256, 512), 600),  # several partitions (the launcher splits for 2 CTAs per SM): reduce too
    "mixtral": ((4096, 14336), (4096, 14336), 4096),
}
HQ, HKV, D, PAGE = 32, 8, 128, 16
TOL = 2e-2  # fp16 kernels with fp32 accumulation against fp32 references; random inputs of unit scale
CHECKS = ("gemm1", "gemm16", "qkv", "dequant", "router", "align", "moe1", "moe16", "moe_dense", "layers", "attn")


class Checker:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, name: str, err: float, tol: float = TOL) -> None:
        ok = err == err and err <= tol  # NaN fails
        print(f"{name:<28} rel err {err:.2e}  {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            self.failed.append(name)


def gemm_checks(check: Checker, only: set[str], K: int, N: int, gen: torch.Generator) -> None:
    t = random_exl2_cuda(K, N, pick_recipe(K, N, 4.0), gen)
    p = prepare_exl2(t, gen.device)
    w = ops.exl2_dequant_ref(p).float()
    for m in (1, 16):
        if f"gemm{m}" not in only:
            continue
        x = torch.randn(m, K, device=gen.device, generator=gen).half()
        check(f"exl2_gemm m={m}", rel_err(ops.exl2_gemm(x, p), x.float() @ w))
        if m == 16:
            check(f"exl2_gemm m={m} splits=4", rel_err(ops.exl2_gemm(x, p, splits=4), x.float() @ w))
            xb = x.bfloat16()
            check(f"exl2_gemm m={m} bf16", rel_err(ops.exl2_gemm(xb, p), xb.float() @ w))
    if "qkv" in only:
        others = [prepare_exl2(random_exl2_cuda(K, n, pick_recipe(K, n, 4.0), gen), gen.device) for n in (N // 4,) * 2]
        x = torch.randn(1, K, device=gen.device, generator=gen).half()
        for i, (pj, y) in enumerate(zip([p, *others], ops.exl2_gemm_group(x, [p, *others]))):
            check(f"exl2_gemm_group matrix {i}", rel_err(y, x.float() @ ops.exl2_dequant_ref(pj).float()))
    if "dequant" in only:
        check("exl2_dequant", rel_err(ops.exl2_dequant(p), w), 1e-3)


def routing_checks(check: Checker, only: set[str], gen: torch.Generator) -> None:
    dev = gen.device
    x = torch.randn(37, 256, device=dev, generator=gen).half()
    wr = torch.randn(8, 256, device=dev, generator=gen).half() * 0.05
    if "router" in only:
        logits, w, ids = ops.moe_router(x, wr, 2)
        rl, (rw, rids) = x.float() @ wr.float().t(), ops.topk_softmax_ref(x.float() @ wr.float().t(), 2)
        check("moe_router logits", rel_err(logits, rl), 1e-3)
        tw, tids = ops.topk_softmax(rl, 2)
        check("topk_softmax ids", float((tids.long() != rids.long()).float().mean()), 0.0)
        check("topk_softmax weights", rel_err(tw, rw), 1e-4)
    if "align" in only:
        ids = torch.randint(0, 8, (37, 2), device=dev, generator=gen, dtype=torch.int32)
        got, ref = ops.moe_align(ids, 8, 8), ops.moe_align_ref(ids, 8, 8)
        same = all(torch.equal(getattr(got, f).cpu(), getattr(ref, f).cpu()) for f in ("counts", "offsets"))
        check("moe_align counts/offsets", 0.0 if same else 1.0, 0.0)


def moe_checks(check: Checker, only: set[str], H: int, inter: int, gen: torch.Generator) -> None:
    wanted = [(n, T) for n, T in (("moe1", 1), ("moe16", 16), ("moe_dense", 160)) if n in only]
    if not wanted:
        return
    p, _, _ = build_layer(H, inter, 4.0, gen)
    router = torch.randn(8, H, device=gen.device, generator=gen).half() * 0.05
    for _, T in wanted:  # decode mode (<= 8 tokens), aligned mode, dense path (> 32 rows per expert)
        x = torch.randn(T, H, device=gen.device, generator=gen).half()
        ref = moe.moe_forward_ref(x.float(), router.float(), p, 2)
        check(f"moe layer T={T}", rel_err(moe.moe_forward(x, router, p, 2), ref))


def layer_checks(check: Checker, H: int, gen: torch.Generator) -> None:
    dev = gen.device
    x, r = (torch.randn(5, H, device=dev, generator=gen).half() for _ in range(2))
    w = 1 + 0.1 * torch.randn(H, device=dev, generator=gen).half()
    check("rms_norm", rel_err(layers.rms_norm(x, w, 1e-5)[0], layers.rms_norm_ref(x.float(), w.float(), 1e-5)[0]))
    out, h = layers.rms_norm(x, w, 1e-5, r)
    check("add_rms_norm", rel_err(out, layers.rms_norm_ref(x.float() + r.float(), w.float(), 1e-5)[0]))
    q, k = (torch.randn(5, n, D, device=dev, generator=gen).half() for n in (HQ, HKV))
    ang = torch.rand(5, D, device=dev, generator=gen) * 6.28
    cos, sin = ang.cos().half(), ang.sin().half()
    want = [layers.apply_rope_ref(t.float(), cos.float(), sin.float()) for t in (q, k)]
    for name, got, ref in zip(("rope_qk q", "rope_qk k"), layers.apply_rope_qk(q.clone(), k.clone(), cos, sin), want):
        check(name, rel_err(got, ref))


def attention_checks(check: Checker, context: int, gen: torch.Generator) -> None:
    dev = gen.device
    batch, pages = 2, -(-context // PAGE)
    tables = torch.randperm(batch * pages, device=dev, generator=gen).view(batch, pages).int()
    slots = (tables.long()[:, :, None] * PAGE + torch.arange(PAGE, device=dev)).view(batch, -1)[:, :context]
    slots = slots.reshape(-1)
    seq_lens = torch.tensor([context, context // 3], dtype=torch.int32, device=dev)
    k = torch.randn(slots.numel(), HKV, D, device=dev, generator=gen).half()
    v = torch.randn(slots.numel(), HKV, D, device=dev, generator=gen).half()
    q = torch.randn(batch, HQ, D, device=dev, generator=gen).half()
    for mode in ("fp16", "fp8", "q8", "q4"):
        row, srow = code_width(mode, D), (D // GROUP if mode in ("q8", "q4") else 0)

        def empty(cols, dt):
            return torch.zeros(batch * pages * PAGE, HKV, cols, dtype=dt, device=dev) if cols else None

        dt = code_dtype(mode, torch.float16)
        kc, vc, ks, vs = empty(row, dt), empty(row, dt), empty(srow, torch.float16), empty(srow, torch.float16)
        rk, rv, rks, rvs = (t.clone() if t is not None else None for t in (kc, vc, ks, vs))
        pa.paged_cache_write(k, v, kc, vc, slots, ks, vs)
        pa.paged_cache_write_ref(k, v, rk, rv, slots, rks, rvs)
        diff = float((kc.view(torch.uint8) != rk.view(torch.uint8)).float().mean())
        check(f"paged_cache_write {mode}", diff, 1e-3)  # an fp rounding tie may differ; a wrong slot shows
        args = (q, kc, vc, tables, seq_lens, PAGE, D**-0.5, None, ks, vs)
        out = pa.paged_decode_attention(*args)
        check(f"paged_decode_attention {mode}", rel_err(out, pa.paged_decode_attention_ref(*args)))
        # RoPE fused into the write (a decode step's form): k rotated as stored, q in place.
        ang = torch.rand(batch, D, device=dev, generator=gen) * 6.28
        cos, sin = ang.cos().half(), ang.sin().half()
        qr, rq = q.clone(), q.clone()
        new = (k[:batch], v[:batch])
        pa.paged_cache_write(*new, kc, vc, slots[:batch], ks, vs, q=qr, rope=(cos, sin))
        pa.paged_cache_write_ref(*new, rk, rv, slots[:batch], rks, rvs, q=rq, cos=cos, sin=sin)
        diff = float((kc.view(torch.uint8) != rk.view(torch.uint8)).float().mean())
        check(f"paged_cache_write+rope {mode}", max(diff, rel_err(qr, rq)), 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(CHECKS)}")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else set(CHECKS)
    unknown = only - set(CHECKS)
    if unknown:
        sys.exit(f"launch_kernels: unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    if torch.cuda.is_available() and not ops.cuda_ops_available():
        sys.exit("launch_kernels: a GPU but no usable mixq._C: nothing of ours to launch (did the build fail?)")
    dev = ops.kernel_device() if ops.cuda_ops_available() else bench_device()
    where = "the GPU" if dev.type == "cuda" else "the CPU emulation" if ops.emulated() else "references only"
    print(f"launch_kernels: {args.size} shapes on {where}", flush=True)
    gen = torch.Generator(device=dev).manual_seed(int.from_bytes(os.urandom(4), "little"))
    (K, N), (H, inter), context = SIZES[args.size]
    check = Checker()
    gemm_checks(check, only, K, N, gen)
    routing_checks(check, only, gen)
    moe_checks(check, only, H, inter, gen)
    if "layers" in only:
        layer_checks(check, H, gen)
    if "attn" in only:
        attention_checks(check, context, gen)
    sync()
    if check.failed:
        sys.exit(f"launch_kernels: {len(check.failed)} disagreed with the reference: {', '.join(check.failed)}")
    print("launch_kernels: all agree with their references")


if __name__ == "__main__":
    main()
