"""`mixq convert SRC OUT --bits B ...`"""

from __future__ import annotations

import argparse

from .pipeline import ConvertOptions, convert


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face Mixtral checkpoint to EXL2 at a target bpw")
    p.add_argument("src", help="Hugging Face Mixtral directory (bf16/fp16/fp32, sharded or not, either expert layout)")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--bits", type=float, default=4.0, help="target average bits per weight of the decoder layers")
    p.add_argument("--head-bits", type=int, default=6, help="lm_head bits: 2, 3, 4, 5, 6 or 8")
    p.add_argument(
        "--calibration",
        action="append",
        default=[],
        metavar="FILE",
        help=".txt, .jsonl (text field) or .parquet; repeatable (default: the built-in set)",
    )
    p.add_argument("--rows", type=int, default=None, help="calibration rows for the quantization pass")
    p.add_argument("--measure-rows", type=int, default=None, help="calibration rows for the measurement pass")
    p.add_argument("--length", type=int, default=None, help="tokens per calibration row (default 2048)")
    p.add_argument("--measurement", default=None, help="reuse a measurement.json (skips the measurement pass)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--work-dir", default=None, help="resumable state (default: OUT.work)")
    p.add_argument("--shard-size", type=int, default=8192, help="shard size limit in MiB (0: one file)")
    p.add_argument(
        "--moe-hessian",
        default="auto",
        choices=("auto", "shared", "routed"),
        help="statistics for expert w1/w3: exllamav2's shared all-token Hessian, per-expert routed "
        "tokens, or auto (measure both per layer, keep the better)",
    )
    p.add_argument("--optimizer", default="dp", choices=("dp", "anneal"))
    p.add_argument(
        "--exllamav2-candidates",
        action="store_true",
        help="only exllamav2's candidate recipes (no mixq gap-filling rows)",
    )
    p.set_defaults(func=run)


def run(args) -> None:
    opts = ConvertOptions(
        bits=args.bits,
        head_bits=args.head_bits,
        calibration=args.calibration,
        rows=args.rows,
        measure_rows=args.measure_rows,
        length=args.length,
        measurement=args.measurement,
        device=args.device,
        work_dir=args.work_dir,
        shard_mb=args.shard_size,
        moe_hessian=args.moe_hessian,
        extended_candidates=not args.exllamav2_candidates,
        optimizer=args.optimizer,
    )
    convert(args.src, args.out, opts)
