"""A tiny Mixtral with every linear GPTQ-quantized to EXL2, loaded by mixq.load_model, against its float model."""

import glob
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixq
from mixq.exl2 import parse_recipe
from mixq.exl2.gptq import accumulate_hessian, gptq_quantize

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "lm_head")


def quantize_dir(src: str, dst: str, recipe: str) -> int:
    """Copy `src` to `dst` with every linear as EXL2 (Hessians from random inputs). Returns the linear count."""
    os.makedirs(dst)
    tensors = {}
    for f in glob.glob(os.path.join(src, "*.safetensors")):
        tensors.update(load_file(f))
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and not f.endswith(".json") or f == "config.json":
            shutil.copy(os.path.join(src, f), dst)
    out, hessians, n = {}, {}, 0
    qp = parse_recipe(recipe)
    for key, w in tensors.items():
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and prefix.split(".")[-1] in LINEARS:
            K = w.shape[1]
            if K not in hessians:
                hessians[K] = accumulate_hessian(None, torch.randn(512, K))
            out.update(gptq_quantize(w.float(), hessians[K], qp).exl2.to_dict(prefix))
            n += 1
        else:
            out[key] = w.to(torch.float16)
    save_file(out, os.path.join(dst, "model.safetensors"))
    return n


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# Routing is made dense (every token uses all 4 experts) so the logits are a continuous function of the weights:
# with top-2 routing a near-tie between two experts flips under any perturbation, and then that token's error
# is a routing change, not quantization precision (7 of 30 seeds exceeded 1 % at 8 bits with top-2 because of it).
# Measured on 30 seeds (hidden 64, 2 layers, 4 experts, vocab 512, weights N(0, 0.1)), Frobenius relative error
# of the logits against the float32 transformers model: 8b_32g 0.76-0.83 %; 4b_32g 12.3-13.4 %.
# Bounds: 1 % (the issue's) and 16 %.
@pytest.mark.parametrize("recipe, bound", [("8b_32g", 0.01), ("4b_32g", 0.16)])
def test_quantized_tiny_mixtral_logits(hf_tiny, tmp_path, recipe, bound):
    ref, path = hf_tiny(num_experts_per_tok=4)
    qdir = str(tmp_path / "q")
    n = quantize_dir(path, qdir, recipe)
    c = ref.config
    assert n == c.num_hidden_layers * (4 + 3 * c.num_local_experts) + 1
    model = mixq.load_model(qdir, dtype=torch.float32)
    assert model.exl2_linears == n and model.dense_linears == 0
    ids = torch.randint(0, c.vocab_size, (2, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    err = rel_err(got, expected)
    assert err < bound, err


def test_top2_routing_at_8_bits_typical_token(hf_tiny, tmp_path):
    """With real top-2 routing most tokens keep their experts: the median per-token error stays under 1 %."""
    ref, path = hf_tiny()
    qdir = str(tmp_path / "q")
    quantize_dir(path, qdir, "8b_32g")
    ids = torch.randint(0, ref.config.vocab_size, (2, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        got = mixq.load_model(qdir, dtype=torch.float32)(ids)
    per_token = (got - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert per_token.median().item() < 0.01 and per_token.max().item() < 0.5
