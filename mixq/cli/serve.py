"""`mixq serve`: an OpenAI-compatible HTTP server with a chat page (see mixq/serve/)."""

from __future__ import annotations

import argparse
import os

import mixq
from mixq.engine.generate import Engine
from mixq.engine.planner import parse_seq_len, preflight
from mixq.errors import MixqError


def cmd_serve(args) -> None:
    # Imported here: FastAPI, pydantic and uvicorn would add their start-up time to every other mixq command.
    from mixq.serve.server import bind, serve

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise MixqError(f"{flag} {value}: must be at least 1")
    bind(args.host, args.port).close()  # refuse a taken port before loading the model
    api_key = args.api_key or os.environ.get("MIXQ_API_KEY") or None
    max_seq_len = preflight(args.model, args.device, args.max_seq_len, args.cache)
    model = mixq.load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = mixq.load_tokenizer(args.model)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_seq_len=max_seq_len,
                    cache_tokens=args.cache_tokens, cache_mode=args.cache)  # fmt: skip
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    serve(engine, tokenizer, name, args.host, args.port, api_key=api_key, max_queue=args.max_queue)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming) with a chat page")
    p.add_argument("model", help="model directory (Hugging Face layout, fp16/bf16/fp32 or EXL2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or MIXQ_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-seq-len", type=parse_seq_len, default=None, help="context length: tokens or auto")
    p.add_argument("--cache", default="fp16", choices=("fp16", "q8", "q4", "fp8"), help="KV cache format")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="KV cache size in tokens (default: max-batch x min(context, 4096))")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 (default 256)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory's name)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="compute dtype: float16, bfloat16, float32 or auto")
    p.set_defaults(func=cmd_serve)
