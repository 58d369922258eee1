"""What a checkpoint is: its config and known architectures, safetensors shards, the tokenizer, the Mixtral
network in PyTorch (dense and EXL2 linear layers) and the loader that builds it."""

from mixq.model.loader import load_model
from mixq.model.tokenizer import load_tokenizer

__all__ = ["load_model", "load_tokenizer"]
