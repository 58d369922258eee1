"""`mixq demo`: the whole job on the embedded default model: convert to EXL2, compare, generate."""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import tempfile
import time

import mixq
from mixq.cli.info import describe
from mixq.convert.pipeline import ConvertOptions, convert
from mixq.engine.evaluate import perplexity
from mixq.engine.generate import Engine, Request
from mixq.engine.sampling import SamplingParams
from mixq.synthetic.hf_checkpoint import write_random_checkpoint

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "demo")
PROMPT = "It is a truth universally acknowledged, that"


def demo_model_dir() -> tuple[str, bool]:
    """The shipped model, or (if this checkout has none) a freshly written random one."""
    if os.path.exists(os.path.join(DEMO_DIR, "config.json")):
        return DEMO_DIR, True

    path = os.path.join(tempfile.mkdtemp(prefix="mixq-demo-"), "random-mixtral")
    write_random_checkpoint(path)
    return path, False


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mixq")


def _convert(src: str, bits: float, device: str, quick: bool) -> str:
    """EXL2 copy of `src` at `bits` (cached; the converter only ever leaves complete outputs)."""
    # Keyed by the weights' content, so a retrained or different model never reuses a stale conversion.
    digest = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        with open(f, "rb") as fh:
            digest.update(fh.read())
    name = f"demo-exl2-{bits:g}bpw" + ("-quick" if quick else "") + f"-{digest.hexdigest()[:12]}"
    out = os.path.join(_cache_dir(), name)
    if os.path.exists(os.path.join(out, "config.json")):
        print(f"using the conversion cached in {out} (delete it to convert again)")
    else:
        small = dict(rows=4, measure_rows=2, length=128) if quick else {}
        opts = ConvertOptions(bits=bits, device=device, **small)
        convert(src, out, opts)
    return out


def run_demo(device: str = "auto", bits: float = 4.0, max_new_tokens: int = 60, quick: bool = False) -> None:
    src, trained = demo_model_dir()
    if not trained:
        print(f"No embedded demo model in this checkout: using a random tiny Mixtral at {src} (output is gibberish).")
    print(f"mixq demo: model {src}")
    t0 = time.time()
    exl2_dir = _convert(src, bits, device, quick)
    print(describe(exl2_dir, device=device))
    print(f"(conversion {time.time() - t0:.1f} s)")
    tok = mixq.load_tokenizer(src)
    heldout = os.path.join(src, "heldout.txt")
    models = {
        "fp16": mixq.load_model(src, device=device),
        f"EXL2 {bits:g} bpw": mixq.load_model(exl2_dir, device=device),
    }
    if os.path.exists(heldout):
        with open(heldout, encoding="utf-8") as f:
            ids = tok.encode(f.read())
        for name, model in models.items():
            res = perplexity(model, ids, 256, device=model.device, max_windows=4 if quick else None)
            print(f"held-out perplexity {name:>14}: {res.ppl:8.3f} ({res.tokens} tokens)")
    name, model = list(models.items())[-1]
    print(f"\n[{name}, greedy] ", end="")
    engine = Engine(model, tok, max_batch=1)
    engine.add(Request(tok.encode(PROMPT), max_new_tokens, SamplingParams(temperature=0.0)))
    sys.stdout.write(PROMPT)
    for out in engine.stream():
        sys.stdout.write(out.text)
        sys.stdout.flush()
    print()
