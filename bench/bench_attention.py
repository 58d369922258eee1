"""Decode attention over the paged KV cache at Mixtral 8x7B shapes (32 q heads, 8 kv heads, head_dim 128).

For each cache mode, context and batch: the mixq kernel's time (median over iterations, L2 flushed before
each), the K/V bytes it must read per call divided by that time, and that as a fraction of the device-to-device
copy bandwidth measured in the same run (read + write). Baselines on the same shapes: torch SDPA over the
gathered pages (gather + SDPA, what a PyTorch runtime does) and SDPA alone on contiguous K/V.
Appends to bench/results.jsonl (or $MIXQ_RESULTS) unless --no-append.

    python bench/bench_attention.py [--contexts 1024 8192 32768] [--batches 1 8 32] [--modes fp16 fp8 q8 q4]
    python bench/bench_attention.py --tiny    # context 64, page 16: runs on CPU too (the rehearsal)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import bench_device, on_gpu  # noqa: E402
from bench.results import RESULTS, device_name  # noqa: E402
from bench.results import append_result as _append  # noqa: E402
from mixq.kernels import ops  # noqa: E402
from mixq.kernels.kv_quant import GROUP, code_dtype, code_width  # noqa: E402
from mixq.kernels.paged_attention import available, paged_cache_write, paged_decode_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128
ARCH = "mixtral-8x7b"
DEV = bench_device()


def append_result(metric: str, value, unit: str, config: dict) -> None:
    _append(metric, value, unit, config, path=os.environ.get("MIXQ_RESULTS", RESULTS))


def time_us(fn, iters: int, flush: torch.Tensor | None) -> float:
    """Median µs of `fn` over `iters` calls, each after overwriting `flush` (evicts L2)."""
    if not on_gpu():  # the rehearsal: wall clock
        times = []
        for _ in range(min(iters, 2)):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30 if on_gpu() else 1 << 24, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), 20, None)
    return 2 * src.numel() / us / 1e3


def make_cache(mode: str, batch: int, context: int, page_size: int, act: torch.dtype):
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq
    row, srow = code_width(mode, D), (D // GROUP if mode in ("q8", "q4") else 0)
    dt = code_dtype(mode, act)
    kc = torch.empty(num_pages * page_size, HKV, row, dtype=dt, device=DEV)
    vc = torch.empty_like(kc)
    ks = torch.empty(num_pages * page_size, HKV, srow, dtype=torch.float16, device=DEV) if srow else None
    vs = torch.empty_like(ks) if srow else None
    tables = torch.randperm(num_pages, device=DEV).view(batch, pages_per_seq).int()
    chunk = 1 << 16  # write random k/v through the kernel, in chunks to bound the temporaries
    slots_all = (tables.long()[:, :, None] * page_size + torch.arange(page_size, device=DEV)).view(batch, -1)
    slots_all = slots_all[:, :context].reshape(-1)
    for i in range(0, slots_all.numel(), chunk):
        sl = slots_all[i : i + chunk]
        k = torch.randn(sl.numel(), HKV, D, dtype=act, device=DEV)
        paged_cache_write(k, torch.randn_like(k), kc, vc, sl, ks, vs)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
    bytes_read = batch * context * HKV * 2 * (row * kc.element_size() + srow * 2)
    return kc, vc, ks, vs, tables, seq_lens, slots_all.view(batch, context), bytes_read


def time_baselines(q, kc, vc, slots, scale: float, iters: int, flush) -> tuple[float, float]:
    """µs of torch SDPA over gathered pages (gather included) and of SDPA alone on contiguous K/V."""
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]

    def gather_sdpa():
        k = kc[slots].transpose(1, 2)  # [B, Hkv, L, D]
        v = vc[slots].transpose(1, 2)
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    kcont, vcont = kc[slots].transpose(1, 2).contiguous(), vc[slots].transpose(1, 2).contiguous()
    gathered = time_us(gather_sdpa, iters, flush)
    contiguous = time_us(
        lambda: F.scaled_dot_product_attention(q4, kcont, vcont, scale=scale, enable_gqa=True), iters, flush
    )
    return gathered, contiguous


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["fp16", "fp8", "q8", "q4"])
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="context 64, batch 1, page 16; CPU allowed (rehearsal)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.tiny:
        args.contexts, args.batches, args.page_size, args.iters = [64], [1], 16, 2
        path = "the GPU" if on_gpu() else "the kernel emulation" if ops.emulated() else "the PyTorch reference"
        print(f"bench_attention: tiny shapes on {path}", flush=True)
    elif not (on_gpu() and available()):
        sys.exit("bench_attention: needs a GPU and mixq._C built with the attention ops (--tiny runs on CPU)")
    act = torch.bfloat16
    scale = D**-0.5
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV) if on_gpu() else None
    copy_bw = copy_bandwidth_gbs()
    record = not args.no_append
    if record:
        cfg = {"arch": "device", "op": "d2d_copy", "bytes": 1 << 30, "impl": "torch.copy_"}
        append_result("copy_bandwidth", round(copy_bw, 1), "GB/s", cfg)
    print(f"device {device_name()}  copy bandwidth {copy_bw:.0f} GB/s (read + write)")
    print(
        f"{'mode':>6} {'ctx':>6} {'B':>3} {'mixq us':>9} {'GB/s':>7} {'frac':>5} {'gather+sdpa us':>15} {'sdpa us':>8}"
    )
    for context in args.contexts:
        for batch in args.batches:
            base = None
            for mode in args.modes:
                kc, vc, ks, vs, tables, seq_lens, slots, nbytes = make_cache(mode, batch, context, args.page_size, act)
                q = torch.randn(batch, HQ, D, dtype=act, device=DEV)

                def run(q=q, kc=kc, vc=vc, tables=tables, seq_lens=seq_lens, ks=ks, vs=vs):
                    return paged_decode_attention(q, kc, vc, tables, seq_lens, args.page_size, scale, 0, ks, vs)

                us = time_us(run, args.iters, flush)
                gbs = nbytes / us / 1e3
                if base is None and mode == "fp16":
                    base = time_baselines(q, kc, vc, slots, scale, args.iters, flush)
                gs, sd = base if base is not None else (float("nan"), float("nan"))
                frac = gbs / copy_bw
                print(f"{mode:>6} {context:>6} {batch:>3} {us:>9.1f} {gbs:>7.0f} {frac:>5.2f} {gs:>15.1f} {sd:>8.1f}")
                if record:
                    cfg = {"arch": ARCH, "op": "paged_decode_attention", "batch": batch, "context": context,
                           "cache": mode, "impl": "mixq", "page_size": args.page_size, "dtype": "bf16"}  # fmt: skip
                    append_result("kernel_us", round(us, 2), "us", cfg)
                    append_result("decode_attention_gbps", round(gbs, 1), "GB/s", cfg)
                    append_result("decode_attention_bw_fraction", round(gbs / copy_bw, 3), "fraction", cfg)
                    if mode == "fp16":
                        for impl, t in (("torch_gather_sdpa", gs), ("torch_sdpa_contiguous", sd)):
                            append_result("kernel_us", round(t, 2), "us", {**cfg, "impl": impl})
                del kc, vc, ks, vs
                if on_gpu():
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
