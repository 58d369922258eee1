"""The kernels a decoder layer launches in a decode step, traced from the model (not counted by hand): one
`mixq` op per launch, and every other op inside the layers a view or a no-op (no torch kernel). The static model
(bench/static_model.py) counts the same launches per layer from its own list; this test holds both to the code.

Runs on the kernels (a GPU with mixq._C, or the CPU emulation): a synthetic 4.0 bpw EXL2 model, a q8 paged cache,
two sequences prefilled, then one decode step under a TorchDispatchMode that records every op."""

import os
import random
import sys

import pytest
import torch
from kernel_env import DEV
from torch.utils._python_dispatch import TorchDispatchMode

import mixq
from mixq.engine.kv_cache import PagedContext, PagePool, SeqState
from mixq.kernels import ops
from mixq.model.config import MixtralConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/

pytestmark = [pytest.mark.kernels, pytest.mark.skipif(not ops.cuda_ops_available(), reason="kernels not available")]

# In order, per decoder layer: the input norm, q/k/v in one GEMM, the cache write (with RoPE on q and k), decode
# attention, o_proj, the residual add with the post-attention norm, the router, the two grouped expert GEMMs (SiLU *
# up, the top-k sum and the residual inside them).
LAYER = [
    "mixq.rms_norm",
    "mixq.exl2_gemm_group",
    "mixq.paged_cache_write",
    "mixq.paged_decode_attention",
    "mixq.exl2_gemm",
    "mixq.add_rms_norm",
    "mixq.moe_router",
    "mixq.moe_gate_up",
    "mixq.moe_down",
]


class Trace(TorchDispatchMode):
    """(op name, whether its outputs are new storage, i.e. a kernel ran) for every op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)}  # fmt: skip
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        new = any(t.numel() and t.untyped_storage().data_ptr() not in ins for t in outs)
        self.ops.append((str(func.overloadpacket), new))
        return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mixq.synthetic.exl2_checkpoint import write_synthetic

    cfg = MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        max_position_embeddings=1024, rope_theta=10000.0)  # fmt: skip
    out = str(tmp_path_factory.mktemp("launches") / "m")
    write_synthetic(out, cfg, 4.0, seed=random.randrange(10**6), log=lambda *_: None)
    return mixq.load_model(out, device=DEV, dtype=torch.float16)


@pytest.fixture(scope="module")
def trace(model) -> list[tuple[str, bool]]:
    """The ops of one decode step (after a prefill) of two sequences."""
    pool = PagePool.for_model(model, 256, 16, mode="q8")
    seqs = [SeqState(pages=pool.allocate(4)) for _ in range(2)]
    lengths = [random.randint(1, 40) for _ in seqs]
    with torch.inference_mode():
        ids = torch.randint(3, model.config.vocab_size, (sum(lengths),), device=DEV)
        ctx = PagedContext(pool, list(zip(seqs, lengths)))
        model.forward_tokens(ids, ctx)
        ctx.commit()
        ctx = PagedContext(pool, [(s, 1) for s in seqs])
        assert ctx.use_kernel
        ids = torch.randint(3, model.config.vocab_size, (2,), device=DEV)
        with Trace() as traced:
            model.forward_tokens(ids, ctx)
    return traced.ops


def test_decode_layer_launches(model, trace):
    _checked_layers(model, trace)


def _checked_layers(model, trace) -> list[str]:
    """Checks the layers' launches of a traced decode step; returns the torch kernels launched before the layers."""
    names = [name for name, _ in trace]
    starts = [i for i, n in enumerate(names) if n == "mixq.rms_norm"]
    layers = model.config.num_hidden_layers
    assert len(starts) == layers + 1, names  # each layer's input norm, then the final norm
    for i in range(layers):
        span = trace[starts[i] : starts[i + 1]]
        assert [n for n, _ in span if n.startswith("mixq.")] == LAYER, f"layer {i}: {span}"
        launched = [n for n, new in span if new and not n.startswith("mixq.")]
        assert not launched, f"layer {i}: torch kernels between the mixq ops: {launched}"
    # Outside the layers: the embedding and the RoPE tables before them, the final norm and lm_head after.
    before = [n for n, new in trace[: starts[0]] if new]
    after = [n for n, _ in trace[starts[-1] :] if n.startswith("mixq.")]
    assert after == ["mixq.rms_norm", "mixq.exl2_gemm"], trace[starts[-1] :]
    assert all(new is False for n, new in trace[starts[-1] :] if not n.startswith("mixq.")), trace[starts[-1] :]
    return before


def test_decode_step_launches_outside_the_layers(model, trace):
    from bench import static_model

    before = _checked_layers(model, trace)
    assert len(before) + 1 == sum(static_model.STEP_LAUNCHES.values()), before  # + the final norm


def test_static_model_counts_the_traced_launches():
    from bench import sass, static_model

    so = sass.extension()
    if so is None or sass.cuobjdump() is None:
        pytest.skip("the static model needs the built extension and cuobjdump")
    steps = static_model.figures(so)["steps"]
    assert {s["launches_per_layer"] for s in steps.values()} == {len(LAYER)}


def test_trace_tells_a_kernel_from_a_view():
    """The check above can fail: an op that computes is reported as new storage, a view or a no-op cast is not."""
    x = torch.randn(4, 8, device=DEV)
    with Trace() as trace:
        x.view(8, 4)
        x.to(x.dtype)
        x + 1
    assert ("aten.view", False) in trace.ops and ("aten.add", True) in trace.ops
    assert all(not new for name, new in trace.ops if name != "aten.add"), trace.ops
