"""GPU timing helpers shared by the benchmarks: copy bandwidth, graph/event timing with rotated inputs larger
than L2, and results.jsonl lines (format: ../shared/docs/results-format.md, written by bench/results.py).

Method (see the device notes): warm up, time with CUDA events, take the median of several repetitions, and
never let a repeated input sit in L2: each call in a timed batch reads its own copy of the weights, the
copies together being at least twice the L2 size. Launch gaps are removed by replaying a CUDA graph of the
whole batch; if the callable cannot be captured, eager launches are timed instead (and said so).

Without a GPU (the rehearsal of bench/gpu_check.sh --dry-run: `--tiny` runs on the CPU emulation of the kernels
or on the PyTorch references) the same helpers time with the wall clock; such figures carry device `cpu`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.results import RESULTS, append_result, commit, device_name  # noqa: E402, F401


def on_gpu() -> bool:
    return torch.cuda.is_available()


def bench_device() -> torch.device:
    """Where a benchmark's tensors live: the GPU, else the CPU (kernel emulation or references; --tiny only)."""
    return torch.device("cuda" if on_gpu() else "cpu")


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def _wall_us(fn: Callable[[], object], reps: int) -> float:
    """Median wall-clock µs of `fn` (the CPU path: no events, no graphs)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def l2_bytes() -> int:
    if not on_gpu():
        return 1 << 20  # no L2 to defeat: keep the copies few
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)


def copies_needed(bytes_per_call: int, min_calls: int = 8, max_calls: int = 512) -> int:
    """Distinct input copies so that one pass over them streams >= 2x L2."""
    n = -(-2 * l2_bytes() // max(bytes_per_call, 1))
    return max(min_calls, min(max_calls, n))


def flush_l2() -> None:
    buf = getattr(flush_l2, "_buf", None)
    if buf is None:
        buf = flush_l2._buf = torch.empty(2 * l2_bytes() // 4, dtype=torch.int32, device="cuda")
    buf.add_(1)


def time_events(fn: Callable[[], object], reps: int = 50, warmup: int = 5, flush: bool = True) -> float:
    """Median µs of one call, each timed by its own events, L2 flushed before each (eager launches)."""
    if not on_gpu():
        fn()
        return _wall_us(fn, min(reps, 3))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush:
            flush_l2()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def time_batch(calls: list[Callable[[], object]], reps: int = 20, use_graph: bool = True) -> tuple[float, str]:
    """Median µs per call of running `calls` back to back (each reading its own inputs), and the method used.

    With `use_graph` the batch is captured once into a CUDA graph and the replays are timed.
    """
    if not on_gpu():
        return _wall_us(lambda: [fn() for fn in calls], min(reps, 2)) / len(calls), "cpu"
    for fn in calls[: min(len(calls), 3)]:
        fn()
    torch.cuda.synchronize()
    method = "eager"
    run: Callable[[], object]
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for fn in calls:
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for fn in calls:
                    fn()
            run, method = g.replay, "graph"
        except Exception:  # not capturable (e.g. a peer that syncs): time eagerly
            torch.cuda.synchronize()
            run = lambda: [fn() for fn in calls]  # noqa: E731
    else:
        run = lambda: [fn() for fn in calls]  # noqa: E731
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return statistics.median(times), method


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 30) -> float:
    """Device-to-device copy: (bytes read + bytes written) / time, GB/s (1e9), median of `reps`."""
    if not on_gpu():
        nbytes = min(nbytes, 1 << 24)
    src = torch.randint(0, 127, (nbytes,), dtype=torch.uint8, device=bench_device())
    dst = torch.empty_like(src)
    us = time_events(lambda: dst.copy_(src), reps=reps, warmup=3, flush=False)
    return 2 * nbytes / (us * 1e-6) / 1e9


def record(metric: str, value, unit: str, config: dict, command: str | None = None) -> dict:
    """Append one measured figure to bench/results.jsonl (path overridable with MIXQ_RESULTS)."""
    return append_result(metric, value, unit, config, command=command, path=os.environ.get("MIXQ_RESULTS", RESULTS))


def start_gpu_bench(
    name: str, quick: bool, no_record: bool, tiny: bool = False, argv: list[str] | None = None
) -> tuple[Callable[..., None], float]:
    """The common start of a kernel benchmark: a GPU and mixq._C or exit (`tiny` runs anywhere), then the copy
    bandwidth measured and recorded. Returns (rec(metric, value, unit, config) honouring --no-record, copy GB/s)."""
    from mixq.kernels import ops

    torch.set_num_threads(4)
    if not tiny and not (on_gpu() and ops.cuda_ops_available()):
        sys.exit(f"{name}: needs a CUDA GPU and the compiled mixq._C extension (--tiny runs on CPU)")
    if tiny and not on_gpu():
        path = "the kernel emulation" if ops.emulated() else "the PyTorch references (no kernels)"
        print(f"{name}: no GPU, tiny shapes on {path}; timings are meaningless", flush=True)
    args = sys.argv[1:] if argv is None else argv
    cmd = " ".join([f"python -m bench.{name}"] + args)

    def rec(metric: str, value, unit: str, config: dict) -> None:
        if not no_record:
            record(metric, value, unit, config, command=cmd)

    copy_bw = copy_bandwidth_gbs()
    print(f"device: {device_name()}; copy bandwidth (read+write): {copy_bw:.0f} GB/s", flush=True)
    rec("copy_bandwidth", round(copy_bw, 1), "GB/s", {"arch": "device", "bytes": 1 << 30, "impl": "torch.copy_"})
    return rec, copy_bw
