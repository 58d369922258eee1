"""Where the kernel tests run: the GPU with mixq._C, or the CPU under the kernel emulation (MIXQ_CUDA_EMU, built by
tools/cuda_emu/build.py). Tests marked `kernels` run in either; `cuda` ones (streams, graphs) need a GPU."""

import pytest
import torch

from mixq.kernels import ops

DEV = ops.kernel_device()


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def poison_allocator(nbytes: int = 1 << 28) -> None:
    """Fill freed blocks of the CUDA caching allocator with 0xff bytes (NaN as fp16/fp32, -1 as int) so that
    the outputs and scratch the ops allocate start poisoned: an element a kernel forgets to write then fails a
    finiteness or equality check. The emulation poisons every op allocation itself (tools/cuda_emu)."""
    if DEV.type != "cuda":
        return
    sizes, n = [], 1 << 12
    while sum(sizes) + n <= nbytes:
        sizes.append(n)
        n *= 2
    blocks = [torch.full((s,), 0xFF, dtype=torch.uint8, device=DEV) for s in sizes + sizes[::-1][:4]]
    del blocks


# Mixtral-size shapes: seconds on a GPU, many minutes in the CPU emulation (which checks the logic at small ones).
full_size = pytest.mark.skipif(DEV.type != "cuda", reason="full-size shapes run on the GPU only")


def size(n: int) -> int:
    """A sequence length or token count of a kernel test: as written on the GPU, an eighth under the emulation
    (still several pages, tiles and partitions, so the same code paths; keeps CI's emulated run short)."""
    return n if DEV.type == "cuda" else max(1, n // 8)
