"""The reference runtime against transformers' MixtralForCausalLM on tiny random checkpoints."""

import pytest
import torch

import mixq

CONFIGS = {
    "gqa1": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa4": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2),
    "head_dim": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "8x_top1": dict(num_local_experts=8, num_experts_per_tok=1),
    "4x_top2": dict(num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=3),
    "tied": dict(tie_word_embeddings=True),
    "window": dict(sliding_window=8),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("fused", [False, True], ids=["hub", "fused"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(hf_tiny, name, fused):
    ref, path = hf_tiny(fused=fused, **CONFIGS[name])
    ours = mixq.load_model(path, dtype=torch.float32)
    ids = torch.randint(0, ref.config.vocab_size, (3, 21))
    with torch.no_grad():
        expected = ref(ids).logits
    assert rel_err(ours(ids), expected) <= 1e-4


@pytest.mark.parametrize("name", ["gqa4", "8x_top1", "window"])
def test_greedy_generation_matches_transformers(hf_tiny, name):
    ref, path = hf_tiny(**CONFIGS[name])
    ours = mixq.load_model(path, dtype=torch.float32)
    prompt = torch.randint(3, ref.config.vocab_size, (1, 7))
    with torch.no_grad():
        expected = ref.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 7:].tolist()
    from mixq.engine.generate import generate_ids

    got = generate_ids(ours, [prompt[0].tolist()], max_new_tokens=32, eos_ids=[], page_size=4)[0]  # as eos=None
    assert got == expected


def test_bf16_and_fp16_sources_load_in_requested_dtype(hf_tiny, tmp_path):
    ref, path = hf_tiny()
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", save_original_format=True)
    ours = mixq.load_model(str(tmp_path / "bf16"), dtype="float32")
    assert ours.dtype == torch.float32
    ids = torch.randint(0, ref.config.vocab_size, (1, 9))
    from transformers import MixtralForCausalLM

    # The bf16-rounded weights computed in fp32; reloaded rather than ref.float(), which would keep the
    # rotary inv_freq buffer rounded to bf16 by ref.to(bfloat16).
    fp32 = MixtralForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = fp32(ids).logits
    assert rel_err(ours(ids), expected) <= 1e-4
