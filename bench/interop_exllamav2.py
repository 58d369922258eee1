"""EXL2 compatibility against exllamav2 itself, both directions (needs CUDA and `exllamav2==0.3.2`).

1. mixq -> exllamav2: `mixq convert` a tiny Mixtral (and the demo model) at 2.5/4.0/6.0 bpw, load the
   output with exllamav2's loader, compare logits and greedy tokens with mixq's.
2. exllamav2 -> mixq: convert the same model with exllamav2's converter (calibration parquet made from
   our calibration text), load it in mixq, compare logits; compare both converters' quality.
3. Every quantized tensor of both checkpoints: exllamav2's reconstruction == mixq's reference dequant.
Results are appended to bench/results.jsonl ($MIXQ_RESULTS overrides). Run by bench/gpu_check.sh (its last phase,
when the wheels were carried) or bench/gpu_interop.sh; see that file for the carry.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results import RESULTS  # noqa: E402
from bench.results import append_result as _append  # noqa: E402
from mixq.exl2.format import parse_exl2  # noqa: E402
from mixq.exl2.reference import dequantize  # noqa: E402
from mixq.model.checkpoint import TensorIndex  # noqa: E402


def append_result(metric: str, value, unit: str, config: dict) -> None:
    """To bench/results.jsonl, or $MIXQ_RESULTS (bench/gpu_check.sh points it under its output folder)."""
    _append(metric, value, unit, config, path=os.environ.get("MIXQ_RESULTS", RESULTS))


LOGITS_BOUND = 1e-2  # fp16 activations in both runtimes; exllamav2 keeps some partial sums in fp16


def exl_model(path: str):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    config = ExLlamaV2Config(path)
    model = ExLlamaV2(config)
    model.load()
    return model


def exl_linears(model):
    from exllamav2.linear import ExLlamaV2Linear

    seen, stack = {}, list(model.modules)
    while stack:
        m = stack.pop()
        if isinstance(m, ExLlamaV2Linear) and m.q_handle is not None:
            seen[m.key] = m
        stack.extend(getattr(m, "submodules", []) or [])
    return seen


def reconstruct_equal(path: str, model) -> tuple[bool, int, float]:
    """(all equal, number of tensors, largest difference) of exllamav2's fp16 reconstruction vs ours."""
    index = TensorIndex(path)
    worst, n, ok = 0.0, 0, True
    for key, lin in exl_linears(model).items():
        theirs = lin.get_weight_tensor_dq().float().cpu()
        ours = dequantize(parse_exl2(index.get_with_prefix(key), key), dtype=torch.float16).float()
        d = (theirs[:, : ours.shape[1]] - ours).abs().max().item()
        worst, n, ok = max(worst, d), n + 1, ok and d == 0.0
    return ok, n, worst


@torch.inference_mode()
def compare_logits(path: str, exl, ids: torch.Tensor, gen: int = 32) -> dict:
    import mixq

    ours = mixq.load_model(path, device="cuda", dtype=torch.float16)
    a = ours(ids.cuda()).float()
    b = exl.forward(ids).float().cuda()
    rel = ((a - b).norm() / b.norm()).item()
    seq_a, seq_b = ids.clone(), ids.clone()
    for _ in range(gen):
        seq_a = torch.cat([seq_a, ours(seq_a.cuda())[:, -1:].argmax(-1).cpu()], 1)
        seq_b = torch.cat([seq_b, exl.forward(seq_b)[:, -1:].argmax(-1).cpu()], 1)
    return {
        "rel_err": rel,
        "greedy_equal": torch.equal(seq_a, seq_b),
        "greedy_agree": (seq_a == seq_b).float().mean().item(),
    }


def exllamav2_convert(src: str, out: str, bits: float, cal_text: str, work: str, rows: int, length: int) -> None:
    import pandas as pd

    os.makedirs(work, exist_ok=True)
    parquet = os.path.join(work, "cal.parquet")
    paras = [p for p in open(cal_text, encoding="utf-8").read().split("\n\n") if p.strip()]
    pd.DataFrame({"text": paras}).to_parquet(parquet)
    cmd = [
        sys.executable,
        "-m",
        "exllamav2.conversion.convert_exl2",
        "-i",
        src,
        "-o",
        work,
        "-cf",
        out,
        "-b",
        str(bits),
        "-c",
        parquet,
        "-r",
        str(rows),
        "-mr",
        str(min(rows, 16)),
        "-l",
        str(length),
        "-ml",
        str(length),
    ]
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/mixq-interop")
    ap.add_argument("--bits", default="2.5,4.0,6.0")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    import mixq
    from mixq.convert.calibration import BUILTIN
    from mixq.convert.pipeline import ConvertOptions, convert
    from mixq.engine.evaluate import perplexity
    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    os.makedirs(args.work, exist_ok=True)
    sources = {}
    tiny = os.path.join(args.work, "tiny")
    if not os.path.exists(tiny):
        from mixq.model.config import MixtralConfig

        write_random_checkpoint(
            tiny,
            MixtralConfig(
                vocab_size=512,
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=8,
                max_position_embeddings=1024,
                rope_theta=10000.0,
            ),
        )
    sources["tiny"] = tiny
    demo = os.path.join(os.path.dirname(mixq.__file__), "models", "demo")
    if os.path.exists(os.path.join(demo, "config.json")):
        sources["demo"] = demo
    table = []
    for name, src in sources.items():
        ids = torch.randint(3, 500, (1, 64))
        for bits in [float(b) for b in args.bits.split(",")]:
            ours_dir = os.path.join(args.work, f"{name}-mixq-{bits}")
            if not os.path.exists(ours_dir):
                convert(src, ours_dir, ConvertOptions(bits=bits, rows=args.rows, length=args.length, device="cuda"))
            exl = exl_model(ours_dir)
            cmp = compare_logits(ours_dir, exl, ids)
            eq, n, worst = reconstruct_equal(ours_dir, exl)
            table.append((name, bits, "mixq->exllamav2", cmp["rel_err"], cmp["greedy_equal"], eq, n, worst))
            append_result(
                "interop_logits_rel_err",
                cmp["rel_err"],
                "fraction",
                {"arch": name, "bpw": bits, "direction": "mixq->exllamav2"},
            )
            append_result(
                "interop_reconstruct_equal",
                eq,
                "bool",
                {"arch": name, "bpw": bits, "direction": "mixq->exllamav2", "tensors": n},
            )
            del exl
            torch.cuda.empty_cache()
        theirs_dir = os.path.join(args.work, f"{name}-exllamav2-4.0")
        if not os.path.exists(theirs_dir):
            exllamav2_convert(src, theirs_dir, 4.0, BUILTIN, theirs_dir + ".work", args.rows, args.length)
        exl = exl_model(theirs_dir)
        cmp = compare_logits(theirs_dir, exl, ids)
        eq, n, worst = reconstruct_equal(theirs_dir, exl)
        table.append((name, 4.0, "exllamav2->mixq", cmp["rel_err"], cmp["greedy_equal"], eq, n, worst))
        append_result(
            "interop_logits_rel_err",
            cmp["rel_err"],
            "fraction",
            {"arch": name, "bpw": 4.0, "direction": "exllamav2->mixq"},
        )
        append_result(
            "interop_reconstruct_equal",
            eq,
            "bool",
            {"arch": name, "bpw": 4.0, "direction": "exllamav2->mixq", "tensors": n},
        )
        del exl
        heldout = os.path.join(src, "heldout.txt")
        if os.path.exists(heldout):  # quality of the two converters on the same model and bits
            tok = mixq.load_tokenizer(src)
            text_ids = tok.encode(open(heldout, encoding="utf-8").read())
            ref = mixq.load_model(src, device="cuda", dtype=torch.float16)
            for impl, d in (("mixq", os.path.join(args.work, f"{name}-mixq-4.0")), ("exllamav2", theirs_dir)):
                if os.path.exists(d):
                    m = mixq.load_model(d, device="cuda", dtype=torch.float16)
                    r = perplexity(m, text_ids, 256, reference=ref, device="cuda")
                    append_result("ppl", r.ppl, "ppl", {"arch": name, "bpw": 4.0, "impl": impl, "text": "heldout"})
                    append_result(
                        "kl_to_fp16", r.kl, "nats", {"arch": name, "bpw": 4.0, "impl": impl, "text": "heldout"}
                    )
                    print(f"{name} {impl:9s} 4.0 bpw: ppl {r.ppl:.3f} KL {r.kl:.5f}")
    print(
        f"\n{'model':6s} {'bpw':>4s} {'direction':16s} {'logit err':>9s} {'greedy':>6s} {'recon==':>7s} {'n':>4s} "
        f"{'max diff':>8s}  (bound {LOGITS_BOUND})"
    )
    for row in table:
        print(
            f"{row[0]:6s} {row[1]:4.1f} {row[2]:16s} {row[3]:9.2e} {row[4]!s:>6s} {row[5]!s:>7s} {row[6]:4d} "
            f"{row[7]:8.2e}"
        )
    print(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
    main()
