"""What the server needs from the engine: abort, logprobs of sampled and prompt tokens, OpenAI's penalties."""

import random

import pytest
import torch

import mixq
from mixq.engine.evaluate import prompt_logprobs
from mixq.engine.generate import Engine, Request, generate_ids
from mixq.engine.sampling import Sampler, SamplingParams, apply_presence_frequency_penalty, token_logprobs
from mixq.synthetic.hf_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "m"
    write_random_checkpoint(str(path), seed=random.randrange(10**6))
    return mixq.load_model(str(path), dtype=torch.float32)


def _prompts(n, vocab):
    return [torch.randint(3, vocab, (random.randint(2, 20),)).tolist() for _ in range(n)]


def test_abort_running_and_waiting_frees_pages_and_spares_the_others(model):
    prompts = _prompts(5, model.config.vocab_size)
    alone = [generate_ids(model, [p], max_new_tokens=10, eos_ids=[])[0] for p in prompts]
    engine = Engine(model, max_batch=3, page_size=4)
    rids = [engine.add(Request(p, 10, eos_ids=[])) for p in prompts]
    got: dict = {r: [] for r in rids}
    for _ in range(3):
        for o in engine.step():
            got[o.request_id].append(o.token)
    running = [s.req.request_id for s in engine.running]
    waiting = [r.request_id for r in engine.waiting]
    assert len(running) == 3 and len(waiting) == 2
    used = engine.pool.num_pages - engine.pool.free_pages
    victim_run, victim_wait = random.choice(running), random.choice(waiting)
    victim_pages = len(next(s for s in engine.running if s.req.request_id == victim_run).state.pages)
    assert engine.abort(victim_run) and engine.abort(victim_wait)
    assert engine.pool.num_pages - engine.pool.free_pages == used - victim_pages  # freed at once, not next step
    assert not engine.abort(victim_run)  # already gone
    for o in engine.stream():
        got[o.request_id].append(o.token)
        assert o.request_id not in (victim_run, victim_wait)
    for rid, ref in zip(rids, alone):
        if rid == victim_run:
            assert got[rid] == ref[: len(got[rid])] and len(got[rid]) < 10
        elif rid == victim_wait:
            assert got[rid] == []
        else:
            assert got[rid] == ref
    assert engine.pool.free_pages == engine.pool.num_pages


def test_sampled_token_logprobs_equal_a_full_forward(model):
    prompt = _prompts(1, model.config.vocab_size)[0]
    top_n = random.randint(1, 5)
    params = SamplingParams(temperature=1.0, seed=random.randrange(1000))
    engine = Engine(model)
    engine.add(Request(prompt, 6, params, eos_ids=[], logprobs=top_n))
    outs = list(engine.stream())
    tokens = [o.token for o in outs]
    ref = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].double(), dim=-1)
    for i, o in enumerate(outs):
        row = ref[len(prompt) - 1 + i]
        assert o.logprob == pytest.approx(float(row[o.token]), abs=1e-4)
        best = torch.sort(row, descending=True)
        assert [t for t, _ in o.top_logprobs] == best.indices[:top_n].tolist()
        assert [v for _, v in o.top_logprobs] == pytest.approx(best.values[:top_n].tolist(), abs=1e-4)
    engine.add(Request(prompt, 3, eos_ids=[]))
    assert all(o.logprob is None and o.top_logprobs is None for o in engine.stream())  # off unless asked


def test_prompt_logprobs_equal_plain_torch(model):
    ids = _prompts(1, model.config.vocab_size)[0]
    top_n = random.randint(0, 4)
    lps, tops = prompt_logprobs(model, ids, top_n)
    ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    assert lps[0] is None and tops[0] == []
    for t in range(1, len(ids)):
        assert lps[t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        assert [i for i, _ in tops[t]] == torch.topk(ref[t - 1], top_n).indices.tolist()
    assert prompt_logprobs(model, ids[:1], top_n) == ([None], [[]])


def test_token_logprobs_against_log_of_softmax():
    v = random.randint(5, 300)
    logits = torch.randn(4, v) * 3
    tokens = torch.randint(0, v, (4,))
    lp, top_lp, top_ids = token_logprobs(logits, tokens, 3)
    p = torch.exp(logits.double()) / torch.exp(logits.double()).sum(-1, keepdim=True)
    assert torch.allclose(lp.double(), torch.log(p[torch.arange(4), tokens]), atol=1e-5)
    assert torch.equal(top_ids, torch.argsort(p, dim=-1, descending=True)[:, :3])


def test_presence_and_frequency_penalties_follow_openai():
    v = random.randint(10, 100)
    logits = torch.randn(v) * 2
    generated = torch.randint(0, v, (random.randint(1, 30),)).tolist()
    presence, frequency = random.uniform(-2, 2), random.uniform(-2, 2)
    counts = torch.bincount(torch.tensor(generated), minlength=v)
    got = apply_presence_frequency_penalty(logits, counts, presence, frequency)
    for j in range(v):  # OpenAI's formula, one token at a time
        c = generated.count(j)
        assert float(got[j]) == pytest.approx(float(logits[j]) - c * frequency - (c > 0) * presence, abs=1e-5)


def test_sampler_penalizes_what_it_generated():
    # Greedy with a frequency penalty on equal logits: each draw lowers the token drawn, so the draws cycle.
    v = random.randint(3, 20)
    s = Sampler(SamplingParams(frequency_penalty=1.0))
    assert not s.plain_greedy
    draws = [s(torch.zeros(v)) for _ in range(2 * v)]
    assert sorted(draws[:v]) == list(range(v)) and draws[v:] == draws[:v]
    assert int(s.counts.sum()) == 2 * v
    with pytest.raises(mixq.MixqError, match="presence-penalty"):
        SamplingParams(presence_penalty=2.5).validate()
