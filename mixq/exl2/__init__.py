"""EXL2 format (read/write, bit-exact with exllamav2), reference math, the kernels' tile layout and the GPTQ quantizer.

The layer that runs EXL2 weights in a model (`Exl2Linear`) lives in `mixq.model`; random EXL2 tensors in
`mixq.synthetic`."""

from mixq.exl2.format import Exl2Group, Exl2Tensors, make_exl2, parse_exl2
from mixq.exl2.gptq import QuantResult, accumulate_hessian, gptq_quantize, rtn_quantize
from mixq.exl2.pack import make_q_groups, pack_q_weight, pack_scales, unpack_q_weight, unpack_scales
from mixq.exl2.qparams import QPARAMS_ATTN, QPARAMS_HEAD, QPARAMS_MLP, QParams, parse_recipe
from mixq.exl2.reference import dequantize, exl2_matmul_ref

__all__ = [
    "QPARAMS_ATTN",
    "QPARAMS_HEAD",
    "QPARAMS_MLP",
    "Exl2Group",
    "Exl2Tensors",
    "QParams",
    "QuantResult",
    "accumulate_hessian",
    "gptq_quantize",
    "rtn_quantize",
    "dequantize",
    "exl2_matmul_ref",
    "make_exl2",
    "make_q_groups",
    "pack_q_weight",
    "pack_scales",
    "parse_exl2",
    "parse_recipe",
    "unpack_q_weight",
    "unpack_scales",
]
