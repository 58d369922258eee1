"""Batched generation with continuous batching over the paged cache."""

import random

import pytest
import torch

import mixq
from mixq.engine.generate import Engine, Request, generate_ids
from mixq.engine.sampling import SamplingParams
from mixq.synthetic.hf_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "m"
    write_random_checkpoint(str(path), seed=random.randrange(10**6))
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    return mixq.load_model(model_dir, dtype=torch.float32)


def _prompts(n, vocab):
    return [torch.randint(3, vocab, (random.randint(1, 30),)).tolist() for _ in range(n)]


@pytest.mark.parametrize("page_size,max_batch", [(4, 3), (16, 8), (7, 2)])
def test_batched_generation_equals_one_at_a_time(model, page_size, max_batch):
    prompts = _prompts(6, model.config.vocab_size)
    alone = [generate_ids(model, [p], max_new_tokens=12, page_size=page_size)[0] for p in prompts]
    engine = Engine(model, max_batch=max_batch, page_size=page_size, step_tokens=16)
    # Different lengths and budgets: sequences finish at different steps and waiting ones take their place.
    budgets = [random.randint(1, 12) for _ in prompts]
    rids = [engine.add(Request(p, b)) for p, b in zip(prompts, budgets)]
    res = engine.results()
    for rid, seq, b in zip(rids, alone, budgets):
        assert res[rid] == seq[:b]
    assert engine.pool.free_pages == engine.pool.num_pages  # every page went back to the pool


def test_pool_smaller_than_all_requests_still_serves_them(model):
    prompts = _prompts(5, model.config.vocab_size)
    engine = Engine(model, max_batch=5, page_size=4, cache_tokens=64)  # room for about two requests at a time
    rids = [engine.add(Request(p, 8, eos_ids=[])) for p in prompts]  # never ends early: all 8 tokens
    res = engine.results()
    assert all(len(res[r]) == 8 for r in rids)
    assert engine.pool.free_pages == engine.pool.num_pages


def test_eos_stops_a_sequence(model):
    prompt = _prompts(1, model.config.vocab_size)[0]
    first = generate_ids(model, [prompt], max_new_tokens=6, eos_ids=[])[0]  # all 6 tokens
    engine = Engine(model)
    eos = first[2]
    rid = engine.add(Request(prompt, 6, eos_ids=[eos]))
    # A random model may repeat itself: the sequence ends at the first time it samples the eos token.
    assert engine.results()[rid] == first[: first.index(eos) + 1]


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = _prompts(1, model.config.vocab_size)[0]
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    a = generate_ids(model, [prompt], 16, sampling=params, eos_ids=[])[0]  # no eos: 16 tokens to compare
    b = generate_ids(model, [prompt], 16, sampling=params, eos_ids=[])[0]
    c = generate_ids(model, [prompt], 16, sampling=SamplingParams(temperature=1.0, seed=99), eos_ids=[])[0]
    assert a == b and a != c


def test_streamed_text_equals_decoded_ids_and_stop_strings_cut(model_dir, model):
    tok = mixq.load_tokenizer(model_dir)
    prompt = tok.encode("It is a truth universally")
    engine = Engine(model, tok)
    rid = engine.add(Request(prompt, 24))
    outs = list(engine.stream())
    ids = [o.token for o in outs if o.request_id == rid and o.token not in tok.eos_ids]
    text = "".join(o.text for o in outs)
    assert text == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert text.startswith(" ") == tok.decode(prompt + ids[:1]).startswith(tok.decode(prompt) + " ")
    if len(text) > 6:  # stop on a string that occurs in the greedy output: the output ends before it
        stop = text[3:6]
        engine.add(Request(prompt, 24, stop_strings=[stop]))
        cut = "".join(o.text for o in engine.stream())
        assert cut == text[: text.index(stop)]


def test_prompt_errors(model):
    engine = Engine(model, max_seq_len=32)
    with pytest.raises(mixq.MixqError, match="prompt is empty"):
        engine.add(Request([], 4))
    with pytest.raises(mixq.MixqError, match="the context holds 32"):
        engine.add(Request(list(range(3, 40)), 4))
