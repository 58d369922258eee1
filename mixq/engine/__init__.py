"""Serving a batch: the continuous-batching `Engine`, the paged KV cache, sampling, CUDA-graph decode, the
memory planner and perplexity evaluation."""

from mixq.engine.generate import Engine, Output, Request
from mixq.engine.sampling import SamplingParams

__all__ = ["Engine", "Output", "Request", "SamplingParams"]
