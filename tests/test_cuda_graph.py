"""Decode steps replayed from CUDA graphs (mixq.engine.cuda_graph) equal eager decode steps."""

import random

import pytest
import torch

import mixq
from mixq.engine.cuda_graph import buckets
from mixq.engine.generate import Engine, Request
from mixq.engine.sampling import SamplingParams
from mixq.model.config import MixtralConfig


def test_buckets_cover_every_batch_size():
    for max_batch in [1, 2, 3, 8, random.randint(9, 100)]:
        b = buckets(max_batch)
        assert b == sorted(set(b)) and b[-1] == max_batch
        for n in range(1, max_batch + 1):  # every batch has a bucket, padded by less than 2x
            assert n <= min(x for x in b if x >= n) < 2 * n


def _prompts(n: int, vocab: int) -> list[list[int]]:
    return [torch.randint(3, vocab, (random.randint(1, 20),)).tolist() for _ in range(n)]


def _generate(model, prompts, graphs: bool, max_batch: int) -> tuple[list[list[int]], Engine]:
    eng = Engine(model, max_batch=max_batch, page_size=16, cache_tokens=4096, cuda_graphs=graphs)
    rids = [eng.add(Request(p, 24, SamplingParams(temperature=0.0), eos_ids=[])) for p in prompts]
    res = eng.results()
    return [res[r] for r in rids], eng


def test_cuda_graphs_flag_is_ignored_on_cpu(tmp_path):
    from mixq.synthetic.hf_checkpoint import write_random_checkpoint

    write_random_checkpoint(str(tmp_path), seed=random.randrange(10**6))
    model = mixq.load_model(str(tmp_path), dtype=torch.float32)
    prompts = _prompts(3, model.config.vocab_size)
    got, eng = _generate(model, prompts, True, 2)
    assert eng.graphs is None
    assert got == _generate(model, prompts, False, 2)[0]


@pytest.fixture(scope="module")
def exl2_cuda_model(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mixq.synthetic.exl2_checkpoint import write_synthetic

    cfg = MixtralConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,  # head_dim 64 (the decode kernel takes 32, 64 or 128)
        num_key_value_heads=2,
        num_local_experts=8,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    )
    out = str(tmp_path_factory.mktemp("graph") / "m")
    write_synthetic(out, cfg, 4.0, seed=random.randrange(10**6), log=lambda *_: None)
    return mixq.load_model(out, device="cuda", dtype=torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("n_prompts,max_batch", [(1, 1), (3, 4), (5, 8)])
def test_graph_decode_equals_eager(exl2_cuda_model, n_prompts, max_batch):
    model = exl2_cuda_model
    prompts = _prompts(n_prompts, model.config.vocab_size)
    eager, _ = _generate(model, prompts, False, max_batch)
    graphed, eng = _generate(model, prompts, True, max_batch)
    assert eng.graphs is not None and eng.graphs.graphs, "no decode step was captured"
    assert graphed == eager


@pytest.mark.cuda
def test_graph_replay_logits_equal_eager_step(exl2_cuda_model):
    """Same cache state, same tokens: the replayed step's logits equal an eager PagedContext step's."""
    from mixq.engine.kv_cache import PagedContext

    model = exl2_cuda_model
    eng = Engine(model, max_batch=4, page_size=16, cache_tokens=2048, cuda_graphs=True)
    prompts = _prompts(3, model.config.vocab_size)
    for p in prompts:
        eng.add(Request(p, 8, SamplingParams(temperature=0.0), eos_ids=[]))
    while any(s.state.length < len(s.req.prompt_ids) for s in eng.running) or not eng.running:
        eng.step()  # prefill (eager)
    states = [s.state for s in eng.running]
    tokens = [random.randrange(3, model.config.vocab_size) for _ in states]
    lengths = [s.length for s in states]
    replayed = eng.graphs.run(states, tokens).float().clone()
    ctx = PagedContext(eng.pool, [(s, 1) for s in states], model.config.sliding_window)
    eager = model.forward_tokens(torch.tensor(tokens, device="cuda"), ctx).float()
    assert [s.length for s in states] == lengths  # run() itself does not advance the sequences
    assert torch.allclose(replayed, eager, rtol=1e-3, atol=1e-3), (replayed - eager).abs().max()
