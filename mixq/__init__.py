"""mixq: quantized inference for Mixtral-architecture mixture-of-experts models."""

from mixq.errors import CheckpointError, FormatError, MixqError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "FormatError", "MixqError", "load_model", "load_tokenizer"]


def load_model(path, device="cpu", dtype=None):
    """Load a Mixtral checkpoint (fp16/bf16/fp32 or EXL2) from a Hugging Face-layout directory."""
    from mixq.loader import load_model as _load

    return _load(path, device=device, dtype=dtype)


def load_tokenizer(path):
    """Load the tokenizer (tokenizer.json or tokenizer.model) and chat template of a model directory."""
    from mixq.tokenizer import load_tokenizer as _load

    return _load(path)
