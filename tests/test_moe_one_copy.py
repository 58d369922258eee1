"""The kernel path holds each quantized matrix once (bench/RESULTS.md, "stacked copy of every expert").

On the kernel device `SparseMoE.fuse` (by the loader, else on the first forward) stacks the experts for the grouped
kernels and releases the per-expert modules, and `Exl2Linear.prepare` repacks every other EXL2 layer in place: every
tensor reachable from the model, deduplicated by storage, adds up to one copy of the checkpoint before and after a
forward; the tensors as stored are freed (weak references die); the reference path reads the kernel layout and
agrees with the stored tensors' reference; the layout moves and casts with the module, and `state_dict` and
`mixq bench`'s weight traffic count it once.
"""

import dataclasses
import gc
import os
import random
import weakref
from types import SimpleNamespace

import pytest
import torch
from kernel_env import DEV
from safetensors import safe_open
from torch import nn

import mixq
from mixq.cli.bench import weight_traffic
from mixq.exl2.qparams import parse_recipe
from mixq.kernels import moe, ops
from mixq.kernels.moe import route
from mixq.model import loader as loader_module
from mixq.model.config import MixtralConfig
from mixq.model.exl2_linear import Exl2Linear
from mixq.model.mixtral import DenseLinear, Expert, SparseMoE
from mixq.synthetic.exl2_layer import random_exl2

pytestmark = pytest.mark.kernels

# Rel. Frobenius error. Kernels vs the fp32 reference: tests/test_moe_kernels.py's TOL (two chained fp16 GEMMs);
# the per-expert loop in fp16 vs the fp32 reference on the stack: the dequantized weights and outputs in fp16.
TOL = 2e-3
LOOP_TOL = 1e-3


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def reachable_bytes(obj) -> int:
    """Bytes of every tensor reachable from `obj` (module attributes, parameters, buffers, caches, dataclasses such
    as the kernels' PreparedMoE, containers), each storage counted once."""
    storages: dict[int, int] = {}
    seen: set[int] = set()

    def walk(o) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        elif isinstance(o, nn.Module) or (dataclasses.is_dataclass(o) and not isinstance(o, type)):
            walk(vars(o))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v)

    walk(obj)
    return sum(storages.values())


def checkpoint_bytes(path: str) -> int:
    total = 0
    for f in sorted(p for p in os.listdir(path) if p.endswith(".safetensors")):
        with safe_open(os.path.join(path, f), framework="pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2}[t.get_dtype()]
    return total


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mixq.synthetic.exl2_checkpoint import write_synthetic

    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        max_position_embeddings=256,
    )
    out = str(tmp_path_factory.mktemp("one_copy") / "m")
    write_synthetic(out, cfg, 4.0, seed=random.randrange(10**6), log=lambda *_: None)
    return out, cfg


def _load_recording(path: str, monkeypatch) -> tuple[nn.Module, list, list]:
    """The model and weak references to its EXL2 tensors as stored: (experts', the other layers')."""
    expert_refs, other_refs = [], []

    class Recording(Exl2Linear):
        def __init__(self, t, name="", out_features=None):
            super().__init__(t, name, out_features)
            (expert_refs if ".experts." in name else other_refs).append(weakref.ref(self.q_weight))

    with monkeypatch.context() as m:
        m.setattr(loader_module, "Exl2Linear", Recording)
        model = mixq.load_model(path, device=DEV, dtype=torch.float16)
    gc.collect()
    return model, expert_refs, other_refs


def test_loaded_model_holds_each_matrix_once(checkpoint, monkeypatch):
    path, cfg = checkpoint
    with monkeypatch.context() as m:  # on the reference path the tensors as stored are the model's: alive
        m.setattr(ops, "use_kernel", lambda where: False)
        _, expert_refs, other_refs = _load_recording(path, m)
        assert expert_refs and other_refs and all(r() is not None for r in expert_refs + other_refs)
    model, expert_refs, other_refs = _load_recording(path, monkeypatch)
    moes = [layer.block_sparse_moe for layer in model.model.layers]
    assert all(m._fused for m in moes), "the loader did not fuse the MoE layers on the kernel device"
    assert len(expert_refs) == 3 * cfg.num_local_experts * cfg.num_hidden_layers
    assert len(other_refs) == 4 * cfg.num_hidden_layers + 1  # q/k/v/o and the head
    assert all(r() is None for r in expert_refs), "per-expert EXL2 tensors are still alive beside the stack"
    assert all(r() is None for r in other_refs), "stored EXL2 tensors are still alive beside the kernel layout"
    dense = [m for m in model.modules() if isinstance(m, Exl2Linear)]
    assert len(dense) == len(other_refs) and all(m._prepared is not None for m in dense)

    one_copy = checkpoint_bytes(path)
    before = reachable_bytes(model)
    assert before <= one_copy * 1.05, f"{before} bytes reachable after loading, the checkpoint holds {one_copy}"
    # Counted once: state_dict, and mixq bench's weight traffic (all but the embedding table, a lookup).
    sd = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    assert sum(sd.values()) == before
    always, per_expert = weight_traffic(model)
    embed = model.model.embed_tokens.weight
    assert always + sum(per_expert) * cfg.num_local_experts == before - embed.numel() * embed.element_size()

    logits = model(torch.randint(0, cfg.vocab_size, (2, random.randint(3, 12))))
    assert torch.isfinite(logits).all()
    assert reachable_bytes(model) == before, "the first forward added tensors to the model"


def test_prepared_layer_in_place_reference_and_casts(monkeypatch):
    """An EXL2 layer built on the kernel device is prepared by its first forward: the stored tensors are released,
    the reference on the kernel layout is bit-equal to the one on the stored tensors, a cast leaves the quantized
    buffers as they are, and the view follows the buffers when the module moves."""
    g = torch.Generator().manual_seed(torch.seed())
    K, N = 256, 96
    t = random_exl2(K, N, parse_recipe("0.25:6b_32g/0.25:5b_32g/0.5:3b_32g"), generator=g, scale=0.05)
    t = dataclasses.replace(t, bias=torch.randn(N, generator=g).half())
    lin = Exl2Linear(t, "layer").to(DEV)
    del t
    x = torch.randn(3, K, generator=g).half().to(DEV)
    with monkeypatch.context() as m:
        m.setattr(ops, "use_kernel", lambda where: False)
        want = lin(x)  # the reference on the stored tensors
        assert lin._prepared is None
    refs = [weakref.ref(b) for k, b in lin.named_buffers() if k.startswith("q_")]  # the bias stays itself
    before = reachable_bytes(lin)
    got = lin(x)
    gc.collect()
    assert lin._prepared is not None and all(r() is None for r in refs), "stored tensors alive beside the layout"
    assert reachable_bytes(lin) <= before  # one copy (an int32 column of perm stands for q_invperm's)
    with pytest.raises(mixq.MixqError, match="layer: prepared for the kernels"):
        _ = lin.exl2
    assert torch.isfinite(got).all() and rel_err(got, want) <= TOL
    with monkeypatch.context() as m:
        m.setattr(ops, "use_kernel", lambda where: False)
        assert torch.equal(lin(x), want), "the reference on the kernel layout is not the stored tensors' reference"

    bits = {k: v.clone() for k, v in lin.state_dict().items() if k != "bias"}
    lin.to(torch.bfloat16).float()  # a cast is of the activations: the quantized buffers are untouched
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in bits.items())
    lin.half()
    assert lin._prepared.qweight.data_ptr() == lin.qweight.data_ptr()
    with monkeypatch.context() as m:
        m.setattr(ops, "use_kernel", lambda where: False)
        want = lin(x)  # the bias went through bf16
    assert rel_err(lin(x), want) <= TOL


def test_fused_reference_matches_the_expert_loop(checkpoint, monkeypatch):
    """The same layer fused (kernels and reference on the stack) and unfused (the per-expert loop)."""
    path, cfg = checkpoint
    fused = mixq.load_model(path, device=DEV, dtype=torch.float16).model.layers[1].block_sparse_moe
    with monkeypatch.context() as m:
        m.setattr(ops, "use_kernel", lambda where: False)
        loop = mixq.load_model(path, device=DEV, dtype=torch.float16).model.layers[1].block_sparse_moe
    assert fused._fused and not loop._fused and len(loop.experts) == cfg.num_local_experts
    assert not fused.experts and not any(isinstance(m, Exl2Linear) for m in fused.modules())
    for T in (1, 5, 40):  # decode, small and large prefill
        x = torch.randn(T, cfg.hidden_size).half().to(DEV)
        got = fused(x)
        with monkeypatch.context() as m:
            m.setattr(ops, "use_kernel", lambda where: False)
            want = loop(x)
            on_stack = fused(x)
        assert torch.isfinite(got).all()
        assert rel_err(on_stack, want) <= LOOP_TOL, f"T={T}: reference on the stack vs the expert loop"
        w, ids = route(fused.gate(x), cfg.num_experts_per_tok)
        ref = moe.moe_experts_ref(x.float(), w, ids, fused._fused)  # fp32, as tests/test_moe_kernels.py compares
        assert rel_err(got, ref) <= TOL, f"T={T}: kernels vs the fp32 reference on the stack"
        assert rel_err(got, want) <= TOL + LOOP_TOL, f"T={T}: kernels vs the expert loop"


def _layer(E: int, H: int, inter: int, g: torch.Generator) -> tuple[SparseMoE, list]:
    """A SparseMoE built by hand (not by the loader) and weak references to its experts' tensors."""
    recipes = ("4b_32g", "0.5:5b_32g/0.5:4b_32g", "0.25:6b_32g/0.75:3b_32g")
    experts, refs = [], []
    for e in range(E):
        lin = {}
        for name, (K, N), rec in zip(("w1", "w3", "w2"), ((H, inter), (H, inter), (inter, H)), recipes):
            lin[name] = Exl2Linear(random_exl2(K, N, parse_recipe(rec), generator=g, scale=0.05), f"{e}.{name}")
            refs += [weakref.ref(b) for b in lin[name].buffers()]
        experts.append(Expert(lin["w1"], lin["w2"], lin["w3"]))
    gate = DenseLinear(torch.randn(E, H, generator=g))
    return SparseMoE(SimpleNamespace(num_experts_per_tok=2), gate, experts).to(DEV), refs


def test_first_forward_fuses_in_place_and_the_stack_moves_with_the_module(monkeypatch):
    g = torch.Generator().manual_seed(torch.seed())
    E, H, inter = 6, 128, 192
    layer, refs = _layer(E, H, inter, g)
    x = torch.randn(9, H, generator=g).half().float().to(DEV)  # fp16 values: the kernels read x in fp16
    with monkeypatch.context() as m:
        m.setattr(ops, "use_kernel", lambda where: False)
        want = layer(x)  # the per-expert loop, fp32
    assert layer._fused is None and len(layer.experts) == E
    before = reachable_bytes(layer)
    got = layer(x)
    gc.collect()
    assert layer._fused, "the first forward on the kernel device did not take the fused path"
    assert all(r() is None for r in refs), "per-expert tensors are still alive beside the stack"
    after = reachable_bytes(layer)
    assert after <= before * 1.05, f"{before} bytes before the first forward, {after} after"
    assert rel_err(got, want) <= TOL

    bits = {k: v.clone() for k, v in layer.state_dict().items()}
    assert any(k.startswith("fused_experts.") for k in bits) and not any(k.startswith("experts.") for k in bits)
    layer.to(torch.bfloat16).float()  # a cast is of the activations: the quantized stack is untouched
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in bits.items() if not k.startswith("gate."))
    layer.half().to(DEV)
    assert layer._fused and layer._fused.w1.qweight.data_ptr() == layer.fused_experts.w1_qweight.data_ptr()
    xh = x.half()
    w, ids = route(layer.gate(xh), 2)
    ref = moe.moe_experts_ref(xh.float(), w, ids, layer._fused)
    assert rel_err(layer(xh), ref) <= TOL
    with monkeypatch.context() as m:
        m.setattr(ops, "use_kernel", lambda where: False)
        assert rel_err(layer(xh), ref) <= TOL
