"""The `mixq` command line (also `python -m mixq`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import mixq
from mixq.cli import bench as bench_cli
from mixq.cli import serve as serve_cli
from mixq.cli import synth as synth_cli
from mixq.cli.demo import run_demo
from mixq.cli.info import describe
from mixq.convert import cli as convert_cli
from mixq.engine.evaluate import perplexity, through_cache
from mixq.engine.generate import Engine, Request
from mixq.engine.planner import parse_seq_len, preflight
from mixq.engine.sampling import SamplingParams
from mixq.errors import MixqError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (Hugging Face layout, fp16/bf16/fp32 or EXL2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="compute dtype: float16, bfloat16, float32 or auto")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # Defaults follow llama.cpp's; --greedy (or --temperature 0) for deterministic output.
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--max-seq-len", type=parse_seq_len, default=None, help="context length: tokens or auto (default: the model's)"
    )
    p.add_argument("--cache", default="fp16", choices=("fp16", "q8", "q4", "fp8"), help="KV cache format")


def _sampling(args):
    params = SamplingParams(
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    params.validate()
    if args.max_new_tokens < 1:
        raise MixqError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    return params


def _load(args):
    # On CUDA: refuse a context that cannot fit before loading anything, and resolve --max-seq-len auto.
    args.max_seq_len = preflight(args.model, args.device, args.max_seq_len, args.cache)
    model = mixq.load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = mixq.load_tokenizer(args.model)
    return model, tokenizer


def _stream(engine, out=None) -> str:
    out = out or sys.stdout  # looked up at call time so redirected stdout is honoured
    text = []
    for o in engine.stream():
        if o.finish_reason == "error":
            out.write("\n")  # end the partial reply so the error line stands alone
            out.flush()
            raise MixqError(o.error)
        if o.text:
            out.write(o.text)
            out.flush()
            text.append(o.text)
    return "".join(text)


def cmd_generate(args) -> None:
    params = _sampling(args)
    if not args.prompt:
        raise MixqError("--prompt is empty; give some text to continue")
    model, tok = _load(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = tok.encode_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    engine = Engine(
        model, tok, max_batch=1, max_seq_len=args.max_seq_len, cache_tokens=args.max_seq_len, cache_mode=args.cache
    )
    engine.add(Request(ids, args.max_new_tokens, params, stop_strings=args.stop))
    if not args.chat:
        sys.stdout.write(args.prompt)
    _stream(engine)
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    params = _sampling(args)
    model, tok = _load(args)
    engine = Engine(
        model, tok, max_batch=1, max_seq_len=args.max_seq_len, cache_tokens=args.max_seq_len, cache_mode=args.cache
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("mixq chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode_chat(messages)
        if len(ids) >= engine.max_seq_len:
            messages.pop()
            print(
                f"mixq: the conversation ({len(ids)} tokens) no longer fits the context "
                f"({engine.max_seq_len}); type /reset",
                file=sys.stderr,
            )
            continue
        engine.add(Request(ids, args.max_new_tokens, params, stop_strings=args.stop))
        reply = _stream(engine)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})


def cmd_ppl(args) -> None:
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MixqError(f"{args.text}: cannot read text file ({e.strerror})") from None
    model = mixq.load_model(args.model, device=args.device, dtype=args.dtype)
    tok = mixq.load_tokenizer(args.model)
    ids = tok.encode(text)
    scored = model if args.cache is None else through_cache(model, args.cache)
    res = perplexity(scored, ids, args.length, device=model.device, max_windows=args.max_windows)
    via = "" if args.cache is None else f", K/V through a {args.cache} cache"
    print(
        f"perplexity {res.ppl:.4f}  (mean NLL {res.nll:.4f} nats over {res.tokens} tokens, "
        f"windows of {args.length}{via})"
    )


def cmd_info(args) -> None:
    print(describe(args.model, device=args.device, dtype=args.dtype, check=args.check))


def cmd_demo(args) -> None:
    run_demo(device=args.device, bits=args.bits, max_new_tokens=args.max_new_tokens, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Quantized (EXL2) inference for Mixtral-style MoE models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what mixq is doing")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps the conversation")
    _add_model_args(p)
    p.add_argument("--system", default=None)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ppl", help="perplexity of a text file")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--length", type=int, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None)
    cache_help = "score through a paged KV cache of this format"
    p.add_argument("--cache", default=None, choices=("fp16", "q8", "q4", "fp8"), help=cache_help)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("info", help="architecture, parameter count, size and per-layer formats")
    _add_model_args(p)
    p.add_argument(
        "--check", action="store_true", help="also read every value: NaN/inf in any tensor, EXL2 sets (default: off)"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run the whole job on the embedded default model")
    p.add_argument("--device", default="auto")
    p.add_argument("--bits", type=float, default=4.0)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="shorter calibration and evaluation (tests)")
    p.set_defaults(func=cmd_demo)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live in other modules (converter, synthetic checkpoints, benchmark, server)."""
    return [convert_cli.register, synth_cli.register, bench_cli.register, serve_cli.register]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="mixq: %(message)s")
    try:
        args.func(args)
    except MixqError as e:
        print(f"mixq: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmixq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
