import pytest
import torch

# One thread: the tests are dominated by small ops, where extra threads cost more than they give.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    from mixq.kernels import ops

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_kernels = pytest.mark.skip(reason="needs mixq._C and a GPU, or the CPU kernel emulation (MIXQ_CUDA_EMU)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        elif "kernels" in item.keywords and not ops.cuda_ops_available():
            item.add_marker(no_kernels)


# The tiny Mixtral shape most tests use (config.json field names; transformers' and mixq's configs take them).
TINY_MIXTRAL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
)


def make_hf_mixtral(path, fused: bool = False, seed: int | None = None, **overrides):
    """A tiny random MixtralForCausalLM saved by transformers (hub layout, or fused when `fused`)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kw = dict(TINY_MIXTRAL, **overrides)
    torch.manual_seed(torch.seed() if seed is None else seed)
    model = MixtralForCausalLM(MixtralConfig(**kw)).eval()
    with torch.no_grad():  # transformers' init is tiny (std 0.02); widen it so logits are not flat
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1 if "embed" not in name else 1.0)
    model.save_pretrained(str(path), save_original_format=not fused)
    return model


@pytest.fixture
def hf_tiny(tmp_path):
    return lambda fused=False, **kw: (make_hf_mixtral(tmp_path / "hf", fused, **kw), str(tmp_path / "hf"))
