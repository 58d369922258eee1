"""Schemas and fake (meta) impls of torch.ops.mixq.* on fake tensors: runs on CPU when mixq._C is built."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mixq.exl2.layout import prepare_exl2
from mixq.exl2.qparams import parse_recipe
from mixq.kernels import ops
from mixq.synthetic.exl2_layer import random_exl2

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="mixq._C is not built")


def test_fake_shapes_match_the_documented_outputs():
    g = torch.Generator().manual_seed(torch.seed())
    K, N, M, T, k, E, bm = 256, 96, 5, 7, 2, 8, 4
    p = prepare_exl2(random_exl2(K, N, parse_recipe("0.1:8b_32g/0.9:3b_64g"), generator=g, bias=True))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:

        def f(a):
            return None if a is None else mode.from_tensor(a)

        args = (f(p.qweight), f(p.qscale), f(p.scale_max), f(p.tile_group), f(p.perm))
        y = torch.ops.mixq.exl2_gemm(
            f(torch.empty(M, K, dtype=torch.float16)), *args, f(p.bias), list(p.seg_bits), list(p.seg_rows), 0
        )
        assert (tuple(y.shape), y.dtype) == ((M, N), torch.float16)
        w = torch.ops.mixq.exl2_dequant(*args, list(p.seg_bits), list(p.seg_rows))
        assert (tuple(w.shape), w.dtype) == ((K, N), torch.float16)
        wt, ids = torch.ops.mixq.topk_softmax(f(torch.empty(T, E)), k)
        assert (tuple(wt.shape), wt.dtype, tuple(ids.shape), ids.dtype) == ((T, k), torch.float32, (T, k), torch.int32)
        lg, wt, ids = torch.ops.mixq.moe_router(
            f(torch.empty(T, 64, dtype=torch.bfloat16)), f(torch.empty(E, 64, dtype=torch.bfloat16)), k
        )
        assert [tuple(o.shape) for o in (lg, wt, ids)] == [(T, E), (T, k), (T, k)]
        assert lg.dtype == wt.dtype == torch.float32 and ids.dtype == torch.int32
        out = torch.ops.mixq.moe_align(f(torch.empty(T, k, dtype=torch.int32)), E, bm)
        cap = ops.align_capacity(T * k, E, bm)
        assert [tuple(o.shape) for o in out] == [(E,), (E + 1,), (cap,), (cap // bm,), (T, k)]
        assert all(o.dtype == torch.int32 for o in out)
