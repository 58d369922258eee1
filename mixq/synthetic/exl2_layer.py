"""Random but valid EXL2 layers made directly from random codes (no GPTQ): fast even at 14336 x 4096."""

from __future__ import annotations

import math

import torch

from mixq.exl2.format import Exl2Tensors, make_exl2
from mixq.exl2.qparams import QParams

# rms of ((c+1)/16)^2 over uniform codes c in 0..15: lets `scale` set the weights' standard deviation.
_CODE_RMS = math.sqrt(sum((k / 16) ** 4 for k in range(1, 17)) / 16)


def random_exl2(
    K: int,
    N: int,
    qparams: QParams,
    generator: torch.Generator | None = None,
    scale: float = 0.02,
    permute: bool = True,
    bias: bool = False,
) -> Exl2Tensors:
    """A valid EXL2 layer `K x N` (CPU) with uniform codes and scale codes and a random permutation.

    Every code value and scale code occurs, which suits kernel tests; the weights' std is about `scale`.
    """
    if N % 32:
        raise ValueError(f"random_exl2: N={N} must be a multiple of 32")
    gb = qparams.groups(K)
    q = torch.cat([torch.randint(0, 1 << b, (r, N), generator=generator, dtype=torch.int32) for b, r in gb])
    codes = torch.randint(0, 16, (len(gb), N), generator=generator, dtype=torch.int32)
    # uniform q - zero has rms ~ 2^(b-1)/sqrt(3)
    smax = torch.tensor([scale * math.sqrt(3) / ((1 << (b - 1)) * _CODE_RMS) for b, _ in gb])
    smax = smax * (0.75 + 0.5 * torch.rand(len(gb), generator=generator))
    inv = torch.randperm(K, generator=generator) if permute else torch.arange(K)
    b = (torch.randn(N, generator=generator) * scale) if bias else None
    return make_exl2(q, gb, codes, smax, inv, b)
