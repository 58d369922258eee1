"""The `mixq` command line (also `python -m mixq`)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
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
from mixq.model.config import MixtralConfig

CHAT_HELP = """commands:
  /help    this list
  /reset   forget the conversation (the system message stays)
  /exit    end the session (also /quit, Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during a reply stops that reply."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (Hugging Face layout, fp16/bf16/fp32 or EXL2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="compute dtype: float16, bfloat16, float32 or auto")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # Defaults follow llama.cpp's; --greedy (or --temperature 0) for deterministic output.
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: %(default)s)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default: %(default)s)"
    )
    p.add_argument(
        "--top-k", type=int, default=40, help="sample from the K likeliest tokens; 0: all (default: %(default)s)"
    )
    p.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus: the likeliest tokens up to this mass (default: %(default)s)"
    )
    p.add_argument(
        "--min-p", type=float, default=0.05, help="drop tokens below P x the top probability (default: %(default)s)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="penalize tokens already in the text by R (llama.cpp's rule); 1 is off (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one each run)")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0 (default: off)")
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable (default: none)")
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens (default: off)"
    )
    p.add_argument(
        "--max-seq-len",
        type=parse_seq_len,
        default=None,
        help="context length in tokens, or auto: the longest that fits the GPU (default: the model's context)",
    )
    p.add_argument(
        "--cache", default="fp16", choices=("fp16", "q8", "q4", "fp8"), help="KV cache format (default: %(default)s)"
    )


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
    limit = MixtralConfig.from_dir(args.model).max_position_embeddings
    if isinstance(args.max_seq_len, int) and args.max_seq_len > limit:
        print(
            f"mixq: --max-seq-len {args.max_seq_len} capped to {limit}, the model's context "
            "(max_position_embeddings in config.json); positions past it were never trained",
            file=sys.stderr,
        )
        args.max_seq_len = limit
    # On CUDA: refuse a context that cannot fit before loading anything, and resolve --max-seq-len auto.
    args.max_seq_len = preflight(args.model, args.device, args.max_seq_len, args.cache)
    model = mixq.load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = mixq.load_tokenizer(args.model)
    return model, tokenizer


def _request(args, ids: list[int], params: SamplingParams) -> Request:
    return Request(ids, args.max_new_tokens, params, stop_strings=args.stop, eos_ids=[] if args.ignore_eos else None)


def _stream(engine, req: Request, stop: list | None = None) -> str:
    """Run `req` to its end, streaming text to stdout; returns the text. A non-empty `stop` list (set by a
    signal handler) ends the reply after the current token. Says on stderr when the context ended it."""
    out = sys.stdout  # looked up at call time so redirected stdout is honoured
    rid = engine.add(req)
    text, generated, reason = [], 0, None
    for o in engine.stream():
        if o.finish_reason == "error":
            out.write("\n")  # end the partial reply so the error line stands alone
            out.flush()
            raise MixqError(o.error)
        generated += o.token is not None
        reason = o.finish_reason or reason
        if o.text:
            out.write(o.text)
            out.flush()
            text.append(o.text)
        if stop and not o.finished:
            engine.abort(rid)
            break
    used = len(req.prompt_ids) + generated
    if reason == "length" and generated < req.max_new_tokens and used >= engine.max_seq_len:
        full = engine.max_seq_len >= engine.model.config.max_position_embeddings
        fix = "that is the model's context" if full else "raise --max-seq-len"
        out.flush()
        print(
            f"\nmixq: stopped at the context length, {engine.max_seq_len} tokens "
            f"({len(req.prompt_ids)} prompt + {generated} generated; {fix})",
            file=sys.stderr,
        )
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
    if len(ids) >= engine.max_seq_len:
        full = engine.max_seq_len >= model.config.max_position_embeddings
        raise MixqError(
            f"the prompt has {len(ids)} tokens but the context holds {engine.max_seq_len}"
            + ("; that is the model's context, shorten the prompt" if full else "; shorten it or raise --max-seq-len")
        )
    req = _request(args, ids, params)
    if not args.chat:
        sys.stdout.write(args.prompt)
    _stream(engine, req)
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    params = _sampling(args)
    model, tok = _load(args)
    engine = Engine(
        model, tok, max_batch=1, max_seq_len=args.max_seq_len, cache_tokens=args.max_seq_len, cache_mode=args.cache
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    stop: list[bool] = []  # set by Ctrl-C during a reply
    interactive = sys.stdin.isatty()
    if interactive:
        print("mixq chat: type a message; /help lists the commands, Ctrl-C stops a reply, /exit or Ctrl-D quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()  # Ctrl-C here raises KeyboardInterrupt: main() ends with 130
        if not line:
            break
        line = line.rstrip("\n")
        word = line.strip().split(" ")[0]
        if word in ("/exit", "/quit"):
            break
        if word == "/help":
            print(CHAT_HELP, flush=True)
            continue
        if word == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared" + (", system message kept)" if args.system else ")"), flush=True)
            continue
        if re.fullmatch(r"/[A-Za-z]+", word):  # "/usr/bin is ..." is a message, "/quiet" a command
            print(f"unknown command {word}; /help lists the commands", file=sys.stderr, flush=True)
            continue
        if not word:
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
        stop.clear()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))  # Ctrl-C ends this reply only
        try:
            reply = _stream(engine, _request(args, ids, params), stop)
        finally:
            signal.signal(signal.SIGINT, previous)
        print(flush=True)
        if stop:
            print("(reply stopped)", file=sys.stderr, flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})


def cmd_ppl(args) -> None:
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MixqError(f"{args.text}: cannot read text file ({e.strerror})") from None
    limit = MixtralConfig.from_dir(args.model).max_position_embeddings
    if args.length > limit:
        raise MixqError(
            f"--length {args.length}: longer than the model's context of {limit} tokens "
            f"(max_position_embeddings in config.json); use --length {limit} or less"
        )
    model = mixq.load_model(args.model, device=args.device, dtype=args.dtype)
    tok = mixq.load_tokenizer(args.model)
    ids = tok.encode(text)
    scored = model if args.cache is None else through_cache(model, args.cache)
    res = perplexity(scored, ids, args.length, device=model.device, max_windows=args.max_windows)
    via = "" if args.cache is None else f", K/V through a {args.cache} cache"
    print(
        f"perplexity {res.ppl:.4f}  (mean NLL {res.nll:.4f} nats over {res.tokens} tokens, "
        f"windows of {args.length} tokens{via})"
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
    # 256 is the window of the README's and bench/RESULTS.md's figures.
    p.add_argument("--length", type=int, default=256, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default: all)")
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
    except KeyboardInterrupt as e:  # a command may say how to go on (convert: where the same command resumes)
        print("\nmixq: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
