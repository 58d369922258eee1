"""`mixq serve` through the official `openai` client against a live server on 127.0.0.1 (the embedded demo model):
every endpoint, the refusals (400/401/404/503) in OpenAI's error shape, greedy text equal to `mixq generate`, and
a request that fails inside the engine without taking the loop down."""

from __future__ import annotations

import random
import secrets
import signal
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from serve_util import start_server

import mixq
from mixq.cli.demo import DEMO_DIR
from mixq.cli.main import main

WORDS = "the of and a to in was he it that his her had with for as but she you not at on they which be".split()


def _prompt(n: int | None = None) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n or random.randint(3, 10))).capitalize()


@pytest.fixture(scope="module")
def live():
    server, stop = start_server(api_key=secrets.token_hex(8), max_batch=8, max_seq_len=128)
    yield server
    stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.api_key, max_retries=0, timeout=60)


def _post(live, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {live.api_key}", **kw.pop("headers", {})}
    return httpx.post(live.url + path, headers=headers, timeout=60, **kw)


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_models_and_health(live, client):
    models = client.models.list().data
    assert [m.id for m in models] == [live.model_name]
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["kv_pages_total"] == live.engine.pool.num_pages


def test_greedy_completion_equals_mixq_generate(client, capsys):
    prompt, n = _prompt(), random.randint(4, 16)
    assert main(["generate", DEMO_DIR, "--prompt", prompt, "--greedy", "--max-new-tokens", str(n)]) == 0
    expected = capsys.readouterr().out[:-1]  # generate ends with a newline
    got = client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0)
    assert prompt + got.choices[0].text == expected
    usage = got.usage
    assert usage.completion_tokens <= n and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert got.choices[0].finish_reason == ("length" if usage.completion_tokens == n else "stop")


def test_streamed_completion_equals_non_streamed_and_max_tokens(client):
    prompt, n = _prompt(), random.randint(3, 12)
    whole = client.completions.create(
        model="demo", prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.usage.completion_tokens == n and whole.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model="demo",
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_token_id_prompts_and_several_prompts(live, client):
    texts = [_prompt() for _ in range(3)]
    ids = [_post(live, "/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
    by_text = client.completions.create(model="demo", prompt=texts, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    alone = [client.completions.create(model="demo", prompt=t, max_tokens=6, temperature=0) for t in texts]
    assert [c.index for c in by_text.choices] == [0, 1, 2]
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices] == [a.choices[0].text for a in alone]
    assert by_text.usage.prompt_tokens == sum(len(i) for i in ids)


def test_logprobs_of_the_greedy_tokens(client):
    top_n = random.randint(1, 5)
    res = client.completions.create(model="demo", prompt=_prompt(), max_tokens=8, temperature=0, logprobs=top_n)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == res.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= top_n and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the sampled token is the best one


def test_echo_scores_the_prompt_like_a_plain_forward(live, client):
    prompt = _prompt(8)
    res = client.completions.create(model="demo", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    choice = res.choices[0]
    ids = _post(live, "/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset)
    for tok_text, offset in list(zip(lp.tokens, lp.text_offset))[len(ids) :]:  # the generated tokens' place
        assert choice.text[offset : offset + len(tok_text)] == tok_text
    model = mixq.load_model(DEMO_DIR, device="cpu", dtype=torch.float32)
    ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-3)
    streamed = list(
        client.completions.create(model="demo", prompt=prompt, max_tokens=1, temperature=0, echo=True, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_stop_strings_cut_the_text(client):
    prompt = _prompt()
    full = (
        client.completions.create(
            model="demo", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    start = random.randint(2, max(2, len(full) // 2))
    stop = full[start : start + 3]
    cut = client.completions.create(
        model="demo", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00"], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    prompt, seed = _prompt(), random.randrange(2**31)
    kw = dict(model="demo", prompt=prompt, max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a, b = (client.completions.create(seed=seed, **kw).choices[0].text for _ in range(2))
    c = client.completions.create(seed=seed + 1, **kw).choices[0].text
    assert a == b and a != c


def test_chat_stream_and_not(live, client):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": _prompt()}]
    n = random.randint(3, 10)
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=n, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason in ("stop", "length")
    n_prompt = _post(live, "/tokenize", json={"messages": messages}).json()["count"]
    assert whole.usage.prompt_tokens == n_prompt and 1 <= whole.usage.completion_tokens <= n
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    lp = client.chat.completions.create(
        model="demo", messages=messages, max_completion_tokens=n, temperature=0, logprobs=True, top_logprobs=2
    )
    assert lp.choices[0].message.content == text
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in lp.choices[0].logprobs.content)


def test_tokenize_detokenize_round_trip(live):
    text = _prompt()
    ids = _post(live, "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert _post(live, "/detokenize", json={"tokens": ids}).json()["prompt"] == text
    err = _error(_post(live, "/detokenize", json={"tokens": [10**6]}), 400)
    assert err["param"] == "tokens" and str(10**6) in err["message"]


def test_auth(live):
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong-" + live.api_key, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    err = _error(httpx.get(live.url + "/v1/models"), 401)  # no key at all
    assert err["code"] == "invalid_api_key" and "Authorization: Bearer" in err["message"]
    assert httpx.get(live.url + "/health").status_code == 200  # not under /v1: open


def test_bad_requests_are_4xx_naming_the_field(live, client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="demo", prompt="Hello", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=2)
    limit = live.engine.max_seq_len
    with pytest.raises(openai.BadRequestError, match=f"context holds {limit}"):
        client.completions.create(model="demo", prompt=" ".join(["the"] * (limit + 5)), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="ask for at most"):
        client.completions.create(model="demo", prompt="Hello", max_tokens=limit)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="demo", messages=[], max_tokens=2)
    err = _error(
        _post(
            live,
            "/v1/completions",
            content=b'{"prompt": "Hi", "max_tokens": ',
            headers={"Content-Type": "application/json"},
        ),
        400,
    )
    assert "not valid JSON" in err["message"]
    for field, value in [
        ("max_tokens", "many"),
        ("temperature", -1),
        ("top_p", 2),
        ("stream", "perhaps"),
        ("prompt", 42),
        ("presence_penalty", 3),
    ]:
        err = _error(_post(live, "/v1/completions", json={"prompt": "Hi", field: value}), 400)
        assert err["param"] == field and err["type"] == "invalid_request_error"
    err = _error(_post(live, "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert err["param"].startswith("messages")
    err = _error(_post(live, "/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]}), 400)
    assert err["param"] == "messages"  # the chat template's own refusal (roles must alternate)
    _error(_post(live, "/v1/nothing-here", json={}), 404)
    assert live.wait_idle()
    assert client.completions.create(model="demo", prompt="Hello", max_tokens=2).usage.completion_tokens >= 1


def test_request_that_cannot_fit_the_cache_and_a_full_queue(monkeypatch):
    server, stop = start_server(max_batch=1, max_queue=1, max_seq_len=256, cache_tokens=64, page_size=16)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="does not fit the KV cache"):
            client.completions.create(model="demo", prompt=_prompt(5), max_tokens=100)
        # Hold the engine inside a step so the queue cannot drain while the third request arrives.
        gate, model = threading.Event(), server.engine.model
        real_forward = model.forward_tokens
        monkeypatch.setattr(model, "forward_tokens", lambda *a, **k: gate.wait(30) and real_forward(*a, **k))
        gate.set()
        body = {"prompt": _prompt(3), "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as running:
                next(running.iter_lines())  # the first token arrived: this one is in the batch
                gate.clear()
                with http.stream("POST", "/v1/completions", json=body) as queued:  # waits for the only slot
                    assert queued.status_code == 200
                    with pytest.raises(openai.InternalServerError) as full:
                        client.completions.create(model="demo", prompt="Hello", max_tokens=2)
                    assert full.value.status_code == 503 and full.value.response.headers["retry-after"]
                    assert full.value.body["code"] == "queue_full"
                    gate.set()
        assert server.wait_idle()  # both streams were dropped by the client: aborted, pages back
        assert client.completions.create(model="demo", prompt="Hello", max_tokens=2).choices[0].finish_reason
    finally:
        stop()


def test_an_exception_in_the_engine_ends_that_request_not_the_server(live, client, monkeypatch):
    model = live.engine.model
    real_forward = model.forward_tokens
    calls = []

    def failing_forward(*args, **kwargs):  # fails once, inside an engine step, with the request in the batch
        if not calls:
            calls.append(1)
            raise RuntimeError("injected failure")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward_tokens", failing_forward)
    with pytest.raises(openai.APIError, match="injected failure"):
        list(client.completions.create(model="demo", prompt=_prompt(), max_tokens=4, stream=True))
    assert live.wait_idle()
    res = client.completions.create(model="demo", prompt=_prompt(), max_tokens=4, temperature=0)
    assert res.usage.completion_tokens >= 1 and httpx.get(live.url + "/health").json()["status"] == "ok"


def test_metrics(live, client):
    client.completions.create(model="demo", prompt=_prompt(), max_tokens=3, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("mixq_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("mixq_generation_tokens_total", ())] >= 3
    assert samples[("mixq_prompt_tokens_total", ())] >= 3
    assert samples[("mixq_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("mixq_inter_token_latency_seconds_count", ())] >= 2
    assert samples[("mixq_kv_pages_total", ())] == live.engine.pool.num_pages
    for name in ("mixq_requests_running", "mixq_requests_waiting", "mixq_kv_pages_used"):
        assert (name, ()) in samples


def test_cli_serve_prints_the_url_refuses_a_taken_port_and_stops_on_ctrl_c(capsys):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixq", "serve", DEMO_DIR, "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("mixq: serving demo at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
        port = int(url.rsplit(":", 1)[1])
        assert main(["serve", DEMO_DIR, "--port", str(port)]) == 1  # taken: refused before loading anything
        assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit code 130, no traceback
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert main(["serve", DEMO_DIR, "--port", str(s.getsockname()[1]), "--max-batch", "0"]) == 1
    assert "--max-batch 0" in capsys.readouterr().err


def test_non_finite_logits_end_that_request_with_an_error(live, client, monkeypatch):
    model = live.engine.model
    real_forward = model.forward_tokens
    monkeypatch.setattr(model, "forward_tokens", lambda *a, **k: real_forward(*a, **k) * float("nan"))
    with pytest.raises(openai.InternalServerError, match="NaN or inf"):
        client.completions.create(model="demo", prompt=_prompt(), max_tokens=3)
    monkeypatch.setattr(model, "forward_tokens", real_forward)
    assert live.wait_idle()
    assert client.completions.create(model="demo", prompt=_prompt(), max_tokens=2).usage.completion_tokens >= 1
