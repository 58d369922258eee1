"""Sampling: greedy, top-k/top-p/min-p keep sets, repetition penalty, seeding, and the sampled distribution."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mixq.engine.sampling import Sampler, SamplingParams, apply_repetition_penalty, filtered_probs, sample_batch
from mixq.errors import MixqError


def _logits(v: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(v) * scale


def test_greedy_is_argmax():
    for _ in range(50):
        v = random.randint(2, 5000)
        lg = _logits(v)
        hist = torch.randint(0, v, (random.randint(0, 20),))
        assert Sampler(SamplingParams())(lg, hist) == int(np.argmax(lg.numpy()))
        batch = torch.stack([_logits(v) for _ in range(4)])
        got = sample_batch(batch, [Sampler(SamplingParams()) for _ in range(4)], [hist] * 4)
        assert got.tolist() == np.argmax(batch.numpy(), axis=1).tolist()


def test_top_k_stays_in_top_k():
    for _ in range(20):
        v, k = random.randint(20, 300), random.randint(1, 10)
        lg = _logits(v, 0.5)  # flat: without the cut, outside tokens would be drawn often
        top = set(np.argsort(-lg.numpy())[:k].tolist())
        s = Sampler(SamplingParams(temperature=random.uniform(0.5, 3.0), top_k=k))
        draws = {s(lg, torch.empty(0, dtype=torch.long)) for _ in range(200)}
        assert draws <= top
        if k > 1:
            assert len(draws) > 1


def _ref_keep(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Keep set computed independently: float64, explicit loops over the sorted order."""
    z = logits.astype(np.float64) / temperature
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if top_k > 0:
        order = order[:top_k]
    m = max(z[i] for i in order)
    w = {i: math.exp(z[i] - m) for i in order}
    total = sum(w.values())
    p = {i: w[i] / total for i in order}
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    pmax = p[order[0]]
    return {i for i in kept if p[i] >= min_p * pmax}


def test_top_p_min_p_keep_sets():
    checked = 0
    for _ in range(300):
        v = random.randint(2, 400)
        lg = _logits(v, random.uniform(0.5, 4.0))
        params = SamplingParams(
            temperature=random.uniform(0.3, 2.0),
            top_k=random.choice([0, 0, random.randint(1, v)]),
            top_p=random.choice([1.0, random.uniform(0.05, 1.0)]),
            min_p=random.choice([0.0, random.uniform(0.0, 0.5)]),
        )
        probs, ids = filtered_probs(lg, params)
        ids = ids if ids is not None else torch.arange(v)
        got = {int(i) for i, p in zip(ids, probs) if p > 0}
        ref = _ref_keep(lg.numpy(), params.temperature, params.top_k, params.top_p, params.min_p)
        if got != ref:  # only a float32-vs-float64 tie at the top-p boundary may differ
            z = np.sort(lg.numpy().astype(np.float64) / params.temperature)[::-1][: params.top_k or v]
            cum = np.cumsum(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
            assert np.min(np.abs(cum - params.top_p)) < 1e-5, (params, got ^ ref)
            continue
        checked += 1
        assert abs(float(probs.sum()) - 1.0) < 1e-5
    assert checked > 290


def test_repetition_penalty():
    for _ in range(20):
        v = random.randint(10, 200)
        lg = _logits(v)
        hist = torch.randint(0, v, (random.randint(1, 30),))
        pen = random.uniform(1.1, 3.0)
        ref = lg.clone().numpy()
        for i in set(hist.tolist()):
            ref[i] = ref[i] / pen if ref[i] > 0 else ref[i] * pen
        assert Sampler(SamplingParams(repetition_penalty=pen))(lg, hist) == int(np.argmax(ref))
        assert torch.allclose(apply_repetition_penalty(lg, hist, pen), torch.tensor(ref))
    # a repeated top token loses to the runner-up under a strong penalty
    lg = torch.tensor([5.0, 4.0, -1.0])
    assert Sampler(SamplingParams(repetition_penalty=2.0))(lg, torch.tensor([0, 0])) == 1


def test_seed_determinism():
    v = 1000
    logits = [_logits(v, 1.0) for _ in range(50)]
    seed = random.randrange(2**32)

    def run(seed):
        s = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        return [s(lg, torch.empty(0, dtype=torch.long)) for lg in logits]

    assert run(seed) == run(seed)
    assert run(seed) != run(seed + 1)
    assert run(None) != run(None)


def test_distribution_matches_softmax():
    v, n = 8, 20000
    lg = _logits(v, 1.0)
    s = Sampler(SamplingParams(temperature=1.0))
    counts = np.bincount([s(lg, None) for _ in range(n)], minlength=v)
    expected = n * np.exp(lg.numpy().astype(np.float64)) / np.exp(lg.numpy().astype(np.float64)).sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 31.0  # chi-square, 7 degrees of freedom: P(chi2 > 31) < 1e-4


def test_distribution_with_temperature_and_top_k():
    v, n, k, t = 12, 12000, 5, 0.7
    lg = _logits(v, 1.0)
    s = Sampler(SamplingParams(temperature=t, top_k=k))
    counts = np.bincount([s(lg, None) for _ in range(n)], minlength=v)
    z = lg.numpy().astype(np.float64) / t
    top = np.argsort(-z)[:k]
    expected = np.zeros(v)
    expected[top] = np.exp(z[top] - z.max()) / np.exp(z[top] - z.max()).sum() * n
    assert counts[np.setdiff1d(np.arange(v), top)].sum() == 0
    chi2 = float(((counts[top] - expected[top]) ** 2 / expected[top]).sum())
    assert chi2 < 23.5  # 4 degrees of freedom: P(chi2 > 23.5) < 1e-4


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"top_k": -1}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"min_p": -0.01}, "--min-p"),
        ({"min_p": 1.01}, "--min-p"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
        ({"seed": -5}, "--seed"),
    ],
)
def test_invalid_params(kwargs, flag):
    with pytest.raises(MixqError, match=flag) as e:
        SamplingParams(**kwargs).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(MixqError):
        Sampler(SamplingParams(**kwargs))


def test_valid_params_accepted():
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, seed=0).validate()
    SamplingParams(top_p=1.0, min_p=1.0).validate()


def test_sample_batch_mixed_rows_match_single_samplers():
    v = 300
    logits = torch.stack([_logits(v) for _ in range(3)])
    hists = [torch.randint(0, v, (5,)) for _ in range(3)]
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, top_k=20, seed=random.randrange(1000)),
        SamplingParams(temperature=1.2, min_p=0.1, repetition_penalty=1.3, seed=random.randrange(1000)),
    ]
    got = sample_batch(logits, [Sampler(p) for p in params], hists)
    want = [Sampler(p)(row, h) for p, row, h in zip(params, logits, hists)]
    assert got.tolist() == want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampler_on_cuda():
    v = 32000
    lg = _logits(v).cuda()
    hist = torch.randint(0, v, (64,), device="cuda")
    assert Sampler(SamplingParams(), "cuda")(lg, hist) == int(lg.argmax())
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, seed=7)
    a = [Sampler(params, "cuda")(lg, hist) for _ in range(3)]
    assert len(set(a)) == 1
    top = set(torch.topk(apply_repetition_penalty(lg, hist, 1.1), 40).indices.tolist())
    s = Sampler(params, "cuda")
    assert {s(lg, hist) for _ in range(50)} <= top
