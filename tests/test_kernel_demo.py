"""`mixq demo` on the kernels: the embedded model (3 layers, 8 experts, head_dim 32) converted to EXL2 and run on
the kernels (EXL2 dequant and GEMM, grouped MoE, paged cache write and decode attention), against the same
checkpoint on the PyTorch reference path. On a GPU this is the demo's CUDA path; on CPU, the emulation's.

Bounds: the two paths round fp16 activations in different places; measured on CPU (emulation): held-out
perplexity 35.0646 vs 35.0650, KL 2.6e-5 nats per token (the bound leaves 10x for a GPU's accumulation order).
On the first, larger demo model, with the two routing weights of each token swapped in the kernel path:
perplexity 187 vs 67, KL 1.2. Greedy generation can part ways at a near-tie, so the kernel path's
continuation is scored by the reference model instead of compared token by token.
"""

import os
import subprocess
import sys

import pytest
import torch
from kernel_env import DEV

import mixq
from mixq.cli.demo import DEMO_DIR, PROMPT
from mixq.engine import kv_cache
from mixq.engine.evaluate import perplexity
from mixq.engine.generate import generate_ids
from mixq.engine.sampling import SamplingParams
from mixq.kernels import ops
from mixq.model.exl2_linear import Exl2Linear
from mixq.model.mixtral import SparseMoE

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(os.path.join(DEMO_DIR, "config.json")), reason="no demo model"),
]


# `mixq demo --quick`'s mixed recipes, with the cheaper measurement settings; a CPU conversion.
CONVERT = """
import sys
from mixq.convert.pipeline import ConvertOptions, convert
opts = ConvertOptions(bits=4.0, device="cpu", rows=4, measure_rows=2, length=128, moe_hessian="shared",
                      extended_candidates=False)
convert(sys.argv[1], sys.argv[2], opts)
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "exl2")
    # In a child process without the emulation and its AddressSanitizer preload: the conversion never runs a
    # kernel, and under ASan's allocator it takes 5x longer (300 s vs 55 s on CI's 2 cores).
    env = {k: v for k, v in os.environ.items() if k not in ("MIXQ_CUDA_EMU", "LD_PRELOAD", "ASAN_OPTIONS")}
    done = subprocess.run([sys.executable, "-c", CONVERT, DEMO_DIR, out], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return mixq.load_model(out, device=DEV, dtype=torch.float16), mixq.load_tokenizer(DEMO_DIR)


def _on_reference(fn, monkeypatch):
    def run(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(ops, "use_kernel", lambda where: False)
            return fn(*args, **kwargs)

    return run


def test_demo_perplexity_on_kernels(demo, monkeypatch):
    model, tok = demo
    with open(os.path.join(DEMO_DIR, "heldout.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read())
    reference = _on_reference(model, monkeypatch)
    got = perplexity(model, ids, 256, reference=reference, device=DEV, max_windows=3)
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert moes and all(m._fused for m in moes), "the MoE layers did not run on the kernels"
    in_moe = {id(m) for moe in moes for m in moe.modules()}  # the experts run stacked, not one by one
    dense = [m for m in model.modules() if isinstance(m, Exl2Linear) and id(m) not in in_moe]
    assert dense and all(m._prepared is not None for m in dense), "EXL2 layers did not run on the kernels"
    want = perplexity(reference, ids, 256, device=DEV, max_windows=3)
    assert abs(got.ppl / want.ppl - 1) < 2e-3, f"perplexity {got.ppl:.3f} on the kernels, {want.ppl:.3f} reference"
    assert got.kl < 2.5e-4, f"KL(reference || kernels) = {got.kl:.3g} nats per token"


def test_demo_greedy_generation_on_kernels(demo, monkeypatch):
    model, tok = demo
    decode_steps = []

    def counting(*args, **kwargs):
        decode_steps.append(1)
        return attend(*args, **kwargs)

    attend = kv_cache.attend_paged_kernel
    monkeypatch.setattr(kv_cache, "attend_paged_kernel", counting)
    prompt, n = tok.encode(PROMPT), 24
    greedy = SamplingParams(temperature=0.0)
    got = generate_ids(model, [prompt], n, greedy, eos_ids=[], cache_mode="q8")[0]
    assert len(decode_steps) >= (n - 1) * model.config.num_hidden_layers, "decode attention was not the kernel's"
    want = _on_reference(generate_ids, monkeypatch)(model, [prompt], n, greedy, eos_ids=[], cache_mode="q8")[0]

    def nll(tokens: list[int]) -> float:
        """Mean negative log-likelihood of the generated tokens under the reference path."""
        logits = _on_reference(model, monkeypatch)(torch.tensor([prompt + tokens], device=DEV))[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        return -logp.gather(1, torch.tensor(tokens, device=DEV)[:, None]).mean().item()

    text = tok.decode(got)
    assert len(got) == n and text.strip(), text
    assert nll(got) <= nll(want) + 0.05, f"kernel continuation {text!r} is less likely than {tok.decode(want)!r}"
