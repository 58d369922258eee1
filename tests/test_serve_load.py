"""`mixq serve` under load: 32 concurrent streaming clients, and clients that disconnect mid-stream. Every stream
must be well formed and equal to the same request served alone (greedy); afterwards every KV page is free."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest
from serve_util import start_server

WORDS = "the of and a to in was he it that his her had with for as but she you not at on they which be".split()


@pytest.fixture(scope="module")
def live():
    server, stop = start_server(max_batch=8, max_queue=64, max_seq_len=256)
    yield server
    stop()


def _requests(n: int) -> list[dict]:
    reqs = []
    for _ in range(n):
        text = " ".join(random.choice(WORDS) for _ in range(random.randint(1, 12))).capitalize()
        kind = random.choice(["completion", "chat"])
        body = {"prompt": text} if kind == "completion" else {"messages": [{"role": "user", "content": text}]}
        reqs.append({"kind": kind, "max_tokens": random.randint(2, 12), "temperature": 0, "model": "demo", **body})
    return reqs


async def _alone(client: openai.AsyncOpenAI, req: dict) -> tuple[str, str, int]:
    kind, body = req["kind"], {k: v for k, v in req.items() if k != "kind"}
    if kind == "completion":
        res = await client.completions.create(**body)
        return res.choices[0].text, res.choices[0].finish_reason, res.usage.completion_tokens
    res = await client.chat.completions.create(**body)
    return res.choices[0].message.content, res.choices[0].finish_reason, res.usage.completion_tokens


async def _streamed(client: openai.AsyncOpenAI, req: dict) -> tuple[str, str, int]:
    kind, body = req["kind"], {k: v for k, v in req.items() if k != "kind"}
    create = client.completions.create if kind == "completion" else client.chat.completions.create
    stream = await create(**body, stream=True, stream_options={"include_usage": True})
    parts, finishes, ids, usage = [], [], set(), None
    async for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            assert usage is None and not chunk.choices  # one usage chunk, after the choices
            usage = chunk.usage.completion_tokens
            continue
        assert usage is None and len(chunk.choices) == 1 and chunk.choices[0].index == 0
        assert not finishes  # nothing after the finish
        c = chunk.choices[0]
        parts.append((c.text if kind == "completion" else c.delta.content) or "")
        if c.finish_reason:
            finishes.append(c.finish_reason)
    assert len(ids) == 1 and len(finishes) == 1 and usage is not None  # one stream, one finish, usage last
    return "".join(parts), finishes[0], usage


def test_32_concurrent_streams_equal_each_request_alone(live):
    reqs = _requests(32)

    async def run():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
        alone = [await _alone(client, r) for r in reqs]  # one at a time: the server serves only this one
        together = await asyncio.wait_for(asyncio.gather(*(_streamed(client, r) for r in reqs)), timeout=180)
        await client.close()
        return alone, together

    alone, together = asyncio.run(run())
    for req, a, t in zip(reqs, alone, together):
        assert t == a, req
    assert any(a[2] > 1 for a in alone)
    assert live.wait_idle()  # every page back in the pool


def test_clients_that_disconnect_mid_stream_are_aborted(live):
    keep = _requests(8)
    metrics = live.worker.metrics
    aborted_before, generated_before = metrics.aborted._value.get(), metrics.generation_tokens._value.get()

    async def drop(http: httpx.AsyncClient) -> int:
        body = {"prompt": random.choice(WORDS), "max_tokens": 200, "stream": True, "ignore_eos": True}
        seen, leave_after = 0, random.randint(1, 3)
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    seen += 1
                    if seen == leave_after:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def run():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
        alone = [await _alone(client, r) for r in keep]
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            jobs = [drop(http) for _ in range(8)] + [_streamed(client, r) for r in keep]
            random.shuffle(jobs)
            done = await asyncio.wait_for(asyncio.gather(*jobs), timeout=180)
        await client.close()
        return alone, [d for d in done if isinstance(d, tuple)]

    alone, kept = asyncio.run(run())
    assert sorted(kept) == sorted(alone)  # the others completed, unchanged
    assert live.wait_idle()  # the dropped ones (200 tokens each, never finished) were aborted: pages back
    assert metrics.aborted._value.get() - aborted_before == 8
    alone_tokens = 2 * sum(a[2] for a in alone)  # the kept ones, served alone and then streamed
    assert metrics.generation_tokens._value.get() - generated_before - alone_tokens < 8 * 200  # cut short
