"""Serving benchmark: output tokens/s, time to first token and inter-token latency (p50/p99) of `mixq serve` at
several numbers of concurrent streaming clients.

Either point it at a running server (`--url http://127.0.0.1:8000`) or give a model (`--model DIR`, default the
embedded demo model) and it starts `mixq serve` itself on a free port. Every client sends one streaming
completion at a time (`--requests` in a row) of `--max-tokens` tokens with EOS ignored, so every request produces
the same number of tokens. TTFT is measured at the client from sending the request to the first token's event;
ITL between consecutive token events; tokens/s is all clients' completion tokens (the server's `usage`) over the
wall time of the level; with `--repeat N` the median of N runs (by tokens/s) is reported, with every run's tokens/s.
With `--record` each figure is appended to bench/results.jsonl.

    python bench/bench_serve.py --concurrency 1,4,16,64 --repeat 3 --record
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.results import append_result, model_id  # noqa: E402
from mixq.cli.demo import DEMO_DIR  # noqa: E402

WORDS = "the of and a to in was he it that his her had with for as but she you not at on they which be".split()


def start_server(model: str, max_batch: int, device: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "mixq",
        "serve",
        model,
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--max-queue",
        "4096",
        "--device",
        device,
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"bench_serve: the server did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def _pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _one(http: httpx.AsyncClient, model: str, prompt_words: int, max_tokens: int, stats: dict) -> None:
    prompt = " ".join(random.choice(WORDS) for _ in range(prompt_words)).capitalize()
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"bench_serve: HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                stats["tokens"] += chunk["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            if last is None:
                stats["ttft"].append(now - start)
            else:
                stats["itl"].append(now - last)
            last = now


async def run_level(url: str, model: str, clients: int, requests: int, prompt_words: int, max_tokens: int) -> dict:
    stats = {"tokens": 0, "ttft": [], "itl": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:

        async def client() -> None:
            for _ in range(requests):
                await _one(http, model, prompt_words, max_tokens, stats)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {
        "tokens_per_s": stats["tokens"] / wall,
        "wall_s": wall,
        "tokens": stats["tokens"],
        "ttft_ms": {p: 1e3 * _pct(stats["ttft"], p) for p in (50, 99)},
        "itl_ms": {p: 1e3 * _pct(stats["itl"], p) for p in (50, 99)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one for --model)")
    ap.add_argument("--model", default=DEMO_DIR, help="model to serve when no --url (default: the demo model)")
    ap.add_argument("--arch", default=None, help="config.arch in results.jsonl (default: demo for the demo model)")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64, help="--max-batch of the started server")
    ap.add_argument("--device", default="auto", help="--device of the started server")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for the started server")
    ap.add_argument("--repeat", type=int, default=1, help="runs per level; the median run by tokens/s is reported")
    ap.add_argument("--record", action="store_true", help="append the figures to bench/results.jsonl")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, args.max_batch, args.device, args.server_arg)
    try:
        model = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
        asyncio.run(run_level(url, model, 1, 1, args.prompt_words, 4))  # warm-up
        arch = args.arch or ("demo" if os.path.abspath(args.model) == os.path.abspath(DEMO_DIR) else model)
        base = {
            "arch": arch,
            "impl": "mixq",
            "server": "mixq serve",
            "max_tokens": args.max_tokens,
            "prompt_words": args.prompt_words,
            "requests_per_client": args.requests,
        }
        if args.url is None:
            base.update(max_batch=args.max_batch, model_sha256=model_id(args.model))
        print(f"{'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
        for c in (int(x) for x in args.concurrency.split(",")):
            runs = [
                asyncio.run(run_level(url, model, c, args.requests, args.prompt_words, args.max_tokens))
                for _ in range(args.repeat)
            ]
            r = sorted(runs, key=lambda x: x["tokens_per_s"])[len(runs) // 2]  # the median run by throughput
            t, i = r["ttft_ms"], r["itl_ms"]
            each = ", ".join(f"{x['tokens_per_s']:.0f}" for x in runs)
            spread = f"  (runs: {each} tok/s)" if len(runs) > 1 else ""
            print(f"{c:>7} {r['tokens_per_s']:>8.1f} {t[50]:>9.1f} {t[99]:>9.1f} {i[50]:>8.1f} {i[99]:>8.1f}{spread}")
            if args.record:
                cfg = {
                    **base,
                    "concurrency": c,
                    "repeat": len(runs),
                    "runs_tokens_per_s": [round(x["tokens_per_s"], 2) for x in runs],
                }
                append_result("serve_tokens_per_s", round(r["tokens_per_s"], 2), "tok/s", cfg)
                for p in (50, 99):
                    append_result("ttft_ms", round(t[p], 2), "ms", {**cfg, "percentile": p})
                    append_result("itl_ms", round(i[p], 2), "ms", {**cfg, "percentile": p})
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
