"""`Exl2Linear`: an EXL2-quantized linear layer with the reference (dequantize + matmul) forward."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from mixq.errors import FormatError
from mixq.exl2.format import SUFFIXES, Exl2Group, Exl2Tensors, parse_exl2
from mixq.exl2.layout import prepare_exl2
from mixq.exl2.reference import dequantize
from mixq.kernels import ops

log = logging.getLogger("mixq")


def _use_kernels(device: torch.device) -> bool:
    """Whether EXL2 layers on `device` use the kernels (`mixq.kernels.ops.use_kernel`); the choice is logged once."""
    ok = ops.use_kernel(device)
    if device.type != "cpu" or ok:
        _log_choice(str(device), ok)
    return ok


@functools.cache
def _log_choice(device: str, kernels: bool) -> None:
    log.info("EXL2 layers on %s use %s", device, "the mixq._C kernels" if kernels else "the PyTorch reference")


class Exl2Linear(nn.Module):
    """y = x @ W (+ bias), W [K, N] in original feature order, dequantized from EXL2 tensors.

    The forward dequantizes the whole matrix once and caches it in the compute dtype: dequantizing per call
    costs far more than the matmul on CPU, and the cached copy is what exllamav2 itself does for large batches
    (dequantize to fp16, then a dense GEMM). The cache is memory-hungry (a full dense copy), so it is dropped
    whenever the module moves (`_apply`) and can be dropped with `clear_cache()`; fused kernels bypass it.
    """

    q_weight: torch.Tensor
    q_invperm: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor

    def __init__(self, t: Exl2Tensors, name: str = "", out_features: int | None = None):
        """`out_features`: the model's output width when the stored one is it padded to 32 (exllamav2 pads, e.g. an
        lm_head of 32001 tokens is stored 32032 wide); the padding columns are dropped from the output."""
        super().__init__()
        self.name = name
        self._groups: list[Exl2Group] = t.groups
        for k in SUFFIXES:
            self.register_buffer(k, getattr(t, k))
        self.register_buffer("bias", t.bias)
        self.in_features = t.in_features
        self.stored_out_features = t.out_features
        self.out_features = t.out_features if out_features is None else out_features
        if not t.out_features - 32 < self.out_features <= t.out_features:
            raise FormatError(
                f"{name}.q_weight: width {t.out_features} is not {self.out_features} outputs padded to 32"
            )
        self._cache: torch.Tensor | None = None
        self._prepared = None  # PreparedExl2 for the CUDA kernels

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str, out_features: int | None = None) -> Exl2Linear:
        """`tensors` keyed by suffix (q_weight, q_invperm, q_scale, q_scale_max, q_groups, optional bias)."""
        return cls(parse_exl2(tensors, name, out_features=out_features), name, out_features)

    @property
    def exl2(self) -> Exl2Tensors:
        return Exl2Tensors(*(getattr(self, k) for k in SUFFIXES), bias=self.bias, meta=self._groups)

    def bits_per_weight(self) -> float:
        return self.exl2.bits_per_weight()

    def clear_cache(self) -> None:
        self._cache = None

    def _apply(self, fn, recurse=True):
        self._cache = self._prepared = None
        return super()._apply(fn, recurse)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._cache is None or self._cache.dtype != dtype:
            self._cache = dequantize(self.exl2, dtype)
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernels(x.device):
            return self._trim(ops.exl2_matmul(x, self.prepared(x.device)))
        w = self.dequantized(x.dtype)
        y = x @ w
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return self._trim(y)

    def prepared(self, device: torch.device):
        """The kernel layout (`PreparedExl2`), prepared on first use on the kernel device (dropped if it moves)."""
        if self._prepared is None:
            self._prepared = prepare_exl2(self.exl2, device)
        return self._prepared

    def _trim(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.out_features == self.stored_out_features else y[..., : self.out_features].contiguous()

    def extra_repr(self) -> str:
        return f"{self.in_features}x{self.out_features}, {self.bits_per_weight():.2f} bpw"


def linear_group(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, in one kernel launch when they are all EXL2 on the kernel device and the
    batch is one the fused kernel takes (decode; q/k/v of an attention layer): the same outputs, one launch."""
    tokens = x.numel() // x.shape[-1]
    if (
        tokens > ops.DEFAULT_DENSE_THRESHOLD
        or not all(isinstance(m, Exl2Linear) and m.out_features == m.stored_out_features for m in layers)
        or not _use_kernels(x.device)
    ):
        return [m(x) for m in layers]
    return [y.to(x.dtype) for y in ops.exl2_gemm_group(x, [m.prepared(x.device) for m in layers])]
