"""`mixq synth`: write a random EXL2 checkpoint at real Mixtral shapes (see mixq/synthetic/exl2_checkpoint.py)."""

from __future__ import annotations

import argparse

import torch

from mixq.model.archs import arch_config
from mixq.synthetic.exl2_checkpoint import write_synthetic


def cmd_synth(args) -> None:

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = arch_config(args.arch, args.layers)
    log = print if args.verbose_layers else (lambda *_: None)
    rep = write_synthetic(
        args.out, cfg, args.bits, head_bits=args.head_bits, seed=args.seed, shard_mb=args.shard_mb, log=log
    )
    print(
        f"wrote {args.out}: {rep['arch']} with {cfg.num_hidden_layers} layers, {rep['bpw']:.3f} bpw "
        f"(target {args.bits:g}), head {args.head_bits} bits, {rep['bytes'] / 2**30:.2f} GiB"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="random EXL2 checkpoint at real shapes (for planning and benchmarks)")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--arch", required=True, help="mixtral-8x7b, mixtral-8x22b or a config.json path")
    p.add_argument("--bits", type=float, required=True, help="target bits per weight of the decoder layers")
    p.add_argument("--head-bits", type=int, default=6, help="lm_head recipe: 2, 3, 4, 5, 6 (default) or 8")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (quick tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=float, default=2048, help="shard size in MiB (memory use is about one shard)")
    p.add_argument("--verbose-layers", action="store_true", help="print the recipe of every layer")
    p.set_defaults(func=cmd_synth)
