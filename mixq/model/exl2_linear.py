"""`Exl2Linear`: an EXL2-quantized linear layer with the reference (dequantize + matmul) forward."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from mixq.errors import FormatError, MixqError
from mixq.exl2.format import SUFFIXES, Exl2Group, Exl2Tensors, parse_exl2
from mixq.exl2.layout import PreparedExl2, prepare_exl2
from mixq.exl2.reference import dequantize
from mixq.kernels import ops
from mixq.model.packed_buffers import PackedBuffers

log = logging.getLogger("mixq")
# The `PreparedExl2` fields a prepared layer holds as buffers (a dense layer folds no column order).
_PREPARED = ("qweight", "qscale", "scale_max", "tile_group", "perm", "input_perm", "bias")


def _use_kernels(device: torch.device) -> bool:
    """Whether EXL2 layers on `device` use the kernels (`mixq.kernels.ops.use_kernel`); the choice is logged once."""
    ok = ops.use_kernel(device)
    if device.type != "cpu" or ok:
        _log_choice(str(device), ok)
    return ok


@functools.cache
def _log_choice(device: str, kernels: bool) -> None:
    log.info("EXL2 layers on %s use %s", device, "the mixq._C kernels" if kernels else "the PyTorch reference")


class Exl2Linear(PackedBuffers):
    """y = x @ W (+ bias), W [K, N] in original feature order, dequantized from EXL2 tensors.

    Two forms. As built, the module holds the EXL2 tensors as stored (`q_weight`, ... buffers) and runs the
    reference: it dequantizes the whole matrix once and caches it in the compute dtype (dequantizing per call costs
    far more than the matmul on CPU, and the cached copy is what exllamav2 itself does for large batches). The cache
    is a full dense copy, so it is dropped whenever the module moves (`_apply`) and with `clear_cache()`.

    On the kernel device `prepare` (by the loader, else on the first forward there) repacks the matrix into the
    kernels' layout (`PreparedExl2`) and releases the stored tensors: memory holds the matrix once, as the prepared
    buffers (before, the layout built on the first forward sat beside them, after the KV cache had been sized from
    the free memory), and the reference path then dequantizes those (`ops.exl2_dequant_ref`, bit-equal).
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
        self._bpw = t.bits_per_weight()
        self._cache: torch.Tensor | None = None
        self._prepared: PreparedExl2 | None = None  # the kernels' view of the prepared buffers, once prepared

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str, out_features: int | None = None) -> Exl2Linear:
        """`tensors` keyed by suffix (q_weight, q_invperm, q_scale, q_scale_max, q_groups, optional bias)."""
        return cls(parse_exl2(tensors, name, out_features=out_features), name, out_features)

    @property
    def exl2(self) -> Exl2Tensors:
        """The EXL2 tensors as stored; gone once the layer is prepared for the kernels."""
        if self._prepared is not None:
            raise MixqError(f"{self.name}: prepared for the kernels, its EXL2 tensors as stored were released")
        return Exl2Tensors(*(getattr(self, k) for k in SUFFIXES), bias=self.bias, meta=self._groups)

    def bits_per_weight(self) -> float:
        return self._bpw

    def clear_cache(self) -> None:
        self._cache = None

    def _apply(self, fn, recurse=True):
        self._cache = None
        super()._apply(fn, recurse)
        if self._prepared is not None:  # the prepared buffers moved with the module, so the view follows
            self._prepared = self._view(self._prepared.seg_bits, self._prepared.seg_rows)
        return self

    def prepare(self, device: torch.device) -> PreparedExl2 | None:
        """The kernel layout on `device`, built once (then the stored tensors are released); None when the kernels do
        not run on `device` and the layer was never prepared."""
        if self._prepared is None:
            if not _use_kernels(device):
                return None
            p = prepare_exl2(self.exl2, device)
            for k in (*SUFFIXES, "bias"):
                del self._buffers[k]
            for f in _PREPARED:
                self._add(f, getattr(p, f), bits=f == "scale_max")
            self._cache, self._prepared = None, self._view(p.seg_bits, p.seg_rows)
        return self._prepared

    def _view(self, seg_bits: tuple[int, ...], seg_rows: tuple[int, ...]) -> PreparedExl2:
        t = {f: self._get(f) for f in _PREPARED}
        if t["bias"] is not None:  # a float buffer, cast with the model; the kernels add it in fp16
            t["bias"] = t["bias"].half()
        return PreparedExl2(**t, seg_bits=seg_bits, seg_rows=seg_rows, col_order=None)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._cache is None or self._cache.dtype != dtype:
            w = dequantize(self.exl2) if self._prepared is None else ops.exl2_dequant_ref(self._prepared)
            self._cache = w.to(dtype)
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernels(x.device):
            return self._trim(ops.exl2_matmul(x, self.prepare(x.device)))
        y = x @ self.dequantized(x.dtype)
        bias = self.bias if self._prepared is None else self._prepared.bias
        if bias is not None:
            y = y + bias.to(x.dtype)
        return self._trim(y)

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
    return [y.to(x.dtype) for y in ops.exl2_gemm_group(x, [m.prepare(x.device) for m in layers])]
