"""mixq: quantized inference for Mixtral-architecture mixture-of-experts models.

Layers, top to bottom (each imports only those below it; `.importlinter` checks it in CI):
`cli` commands, `serve` the HTTP server, `engine` batched generation and the KV cache, `synthetic` made-up
checkpoints, `convert` the EXL2 converter, `model` checkpoints and the network, `kernels` the CUDA ops and their
references, `exl2` the format.
"""

from mixq.errors import CheckpointError, FormatError, MixqError

__version__ = "0.1.0"

# The public API, one import away. Resolved on first use (PEP 562) so that `import mixq` (and with it
# `mixq.errors`) does not load torch, which every layer below imports.
_API = {
    "load_model": "mixq.model.loader",
    "load_tokenizer": "mixq.model.tokenizer",
    "Engine": "mixq.engine.generate",
    "Request": "mixq.engine.generate",
    "Output": "mixq.engine.generate",
    "SamplingParams": "mixq.engine.sampling",
}

__all__ = ["CheckpointError", "FormatError", "MixqError", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mixq' has no attribute {name!r}")
