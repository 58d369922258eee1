"""The HTTP routes: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (JSON or server-sent events),
vLLM's /tokenize and /detokenize, /health, /metrics (Prometheus text) and the chat page at /."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mixq.engine.generate import Output
from mixq.engine.generate import Request as EngineRequest
from mixq.engine.sampling import SamplingParams
from mixq.errors import MixqError
from mixq.model.tokenizer import Tokenizer
from mixq.serve.errors import APIError, error_body, install
from mixq.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Sampling,
)
from mixq.serve.worker import EngineWorker, Event, Job, QueueFull

CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "chat.html")
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_ENDPOINTS = {"/", "/health", "/metrics", "/tokenize", "/detokenize", "/v1/models", "/v1/completions",
              "/v1/chat/completions"}  # fmt: skip


@dataclass
class ServeState:
    worker: EngineWorker
    tokenizer: Tokenizer
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_seq_len(self) -> int:
        return self.worker.engine.max_seq_len


# --- turning a body into engine requests ---


def _check_model(state: ServeState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(
            404,
            f"model {name!r} does not exist; this server serves {state.model_name!r} (see GET /v1/models)",
            "model",
            "model_not_found",
        )


def _sampling(body: _Sampling) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_k=max(body.top_k, 0),
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def _check_ids(state: ServeState, ids: list[int], param: str) -> None:
    vocab = state.tokenizer.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside the vocabulary (0 to {vocab - 1})", param)


def _engine_request(
    state: ServeState, ids: list[int], max_tokens: int | None, body: _Sampling, param: str, logprobs: int | None
) -> EngineRequest:
    limit = state.max_seq_len
    if max_tokens is None:  # chat without a limit: up to the end of the context
        max_tokens = max(limit - len(ids), 1)
    elif len(ids) < limit < len(ids) + max_tokens:
        raise APIError(
            400,
            f"max_tokens: the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, but the context holds "
            f"{limit} tokens; ask for at most {limit - len(ids)}",
            "max_tokens",
            "context_length_exceeded",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    eos = [] if body.ignore_eos else None
    req = EngineRequest(ids, max_tokens, _sampling(body), stop_strings=stop, eos_ids=eos, logprobs=logprobs)
    try:
        state.worker.engine.check(req)
    except MixqError as e:
        code = "context_length_exceeded" if "context" in str(e) else None
        raise APIError(400, f"{param}: {e}", param, code) from None
    return req


def _completion_prompts(state: ServeState, prompt) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt: text, a list of texts, token ids or a list of token-id lists."""
    tok = state.tokenizer
    if isinstance(prompt, str):
        return [(tok.encode(prompt), prompt)]
    if not prompt:
        raise APIError(400, "prompt: the list is empty; give a text or token ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((tok.encode(p), p))
        else:
            _check_ids(state, p, "prompt")
            out.append((list(p), tok.decode(p)))
    return out


def _chat_ids(state: ServeState, body: ChatCompletionRequest | TokenizeRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return state.tokenizer.encode_chat(messages)
    except MixqError as e:
        raise APIError(400, f"messages: {e}", "messages") from None


def token_text(tok: Tokenizer, i: int) -> str:
    """One token's text as OpenAI lists it in logprobs (sentencepiece's word-start marker as a space)."""
    try:
        piece = tok.id_to_piece(i)
    except MixqError:
        return ""
    text = tok.decode([i], skip_special_tokens=False)
    return " " + text if piece.startswith("\u2581") and not text.startswith(" ") else text


# --- one HTTP request's jobs in the engine ---


class _Group:
    """The jobs of one HTTP request (one per prompt), their shared event queue, and their abort on exit."""

    def __init__(self, worker: EngineWorker, jobs: list[Job]):
        self.worker, self.sink = worker, asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.rids: list[int] = []
        self.done: set[int] = set()
        for job in jobs:
            job.sink, job.loop = self.sink, loop
            try:
                self.rids.append(worker.submit(job))
            except QueueFull as e:
                self.close()
                raise APIError(503, f"the server is busy: {e}; retry later", code="queue_full",
                               headers={"Retry-After": "1"}) from None  # fmt: skip

    async def events(self, request: Request | None = None) -> AsyncIterator[Event]:
        while len(self.done) < len(self.rids):
            try:
                ev = await asyncio.wait_for(self.sink.get(), timeout=1.0)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return  # the caller's close() aborts the rest
                continue
            if ev.kind == "error" or (ev.kind == "token" and ev.output.finished):
                self.done.add(ev.index)
            yield ev

    def close(self) -> None:
        for index, rid in enumerate(self.rids):
            if index not in self.done:
                self.worker.abort(rid)
                self.done.add(index)


class _EventStream(StreamingResponse):
    """Server-sent events that abort the request's jobs however the stream ends (done, error, client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class _Choice:
    """What one prompt's job produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    prompt_scored: tuple[list, list] | None = None
    finish_reason: str | None = None
    error: str | None = None

    def add(self, out: Output) -> None:
        self.text.append(out.text)
        if out.token is not None:
            self.tokens.append(out.token)
            self.logprobs.append(out.logprob)
            self.tops.append(out.top_logprobs)
        if out.finished:
            self.finish_reason = _FINISH.get(out.finish_reason or "", out.finish_reason)


def _apply(choices: dict[int, _Choice], ev: Event) -> None:
    c = choices[ev.index]
    if ev.kind == "prompt":
        c.prompt_scored = ev.prompt_logprobs
    elif ev.kind == "error":
        c.error = ev.message
    else:
        c.add(ev.output)


def _completion_logprobs(tok: Tokenizer, tokens, lps, tops, offset: int | None) -> dict:
    """OpenAI's completion logprobs; `offset` is where the tokens' text starts (None: they are the prompt, whose
    offsets come from decoding each prefix, since a word-start marker is not in the text at the very start)."""
    strs = [token_text(tok, t) for t in tokens]
    if offset is None:
        offsets = [len(tok.decode(tokens[:k])) for k in range(len(tokens))]
    else:
        offsets = []
        for s in strs:
            offsets.append(offset)
            offset += len(s)
    top = [None if t is None else {token_text(tok, i): v for i, v in t} for t in tops]
    return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(tok: Tokenizer, tokens, lps, tops) -> dict:
    def entry(i, v):
        s = token_text(tok, i)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}

    return {"content": [{**entry(t, v), "top_logprobs": [entry(i, w) for i, w in top or []]}
                        for t, v, top in zip(tokens, lps, tops)]}  # fmt: skip


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


# --- the app ---


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="mixq", docs_url=None, redoc_url=None, openapi_url=None)
    install(app)
    tok, worker = state.tokenizer, state.worker
    metrics = worker.metrics

    def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY' with the key the "
                           "server was started with (--api-key or MIXQ_API_KEY)", code="invalid_api_key")  # fmt: skip
        if not secrets.compare_digest(key.strip().encode(), state.api_key.encode()):
            raise APIError(
                401, "invalid API key: it is not the key the server was started with", code="invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mixq",
                "max_model_len": state.max_seq_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        prompts = _completion_prompts(state, body.prompt)
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        jobs = [Job(_engine_request(state, ids, body.max_tokens, body, "prompt", body.logprobs), index=i,
                    echo_logprobs=echo_lp) for i, (ids, _) in enumerate(prompts)]  # fmt: skip
        group = _Group(worker, jobs)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": state.model_name}
        n_prompt = sum(len(ids) for ids, _ in prompts)

        def logprobs_of(c: _Choice, i: int, echo_part: bool) -> dict | None:
            if body.logprobs is None:
                return None
            ids, text = prompts[i]
            if echo_part:  # the prompt's own tokens (first one unscored)
                lps, tops = c.prompt_scored or ([None] * len(ids), [[] for _ in ids])
                tops = [None if k == 0 else t for k, t in enumerate(tops)]
                return _completion_logprobs(tok, ids, lps, tops, None)
            return _completion_logprobs(tok, c.tokens, c.logprobs, c.tops, len(text))

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream() -> AsyncIterator[str]:
                choices = {i: _Choice() for i in range(len(prompts))}
                echoed = set()
                async for ev in group.events():
                    _apply(choices, ev)
                    c = choices[ev.index]
                    if ev.kind == "error":
                        yield _sse(error_body(500, f"prompt {ev.index}: {ev.message}"))
                        continue
                    if body.echo and ev.index not in echoed and (ev.kind == "prompt" or echo_lp is None):
                        echoed.add(ev.index)
                        part = {"index": ev.index, "text": prompts[ev.index][1],
                                "logprobs": logprobs_of(c, ev.index, True), "finish_reason": None}  # fmt: skip
                        yield _sse({**head, "choices": [part]})
                    if ev.kind != "token":
                        continue
                    out = ev.output
                    lp = None
                    if body.logprobs is not None and out.token is not None:
                        offset = len(prompts[ev.index][1]) + sum(map(len, c.text[:-1]))
                        lp = _completion_logprobs(tok, [out.token], [out.logprob], [out.top_logprobs], offset)
                    if out.text or out.finished or lp is not None:
                        part = {"index": ev.index, "text": out.text, "logprobs": lp, "finish_reason": c.finish_reason}
                        yield _sse({**head, "choices": [part]})
                if include_usage:
                    used = sum(len(c.tokens) for c in choices.values())
                    yield _sse({**head, "choices": [], "usage": _usage(n_prompt, used)})
                yield "data: [DONE]\n\n"

            return _EventStream(stream(), group.close)

        choices = {i: _Choice() for i in range(len(prompts))}
        try:
            async for ev in group.events(request):
                _apply(choices, ev)
        finally:
            group.close()
        out = []
        for i, c in choices.items():
            if c.error is not None:
                raise APIError(500, f"prompt {i}: {c.error}")
            text = "".join(c.text)
            lp = logprobs_of(c, i, False)
            if body.echo:
                text = prompts[i][1] + text
                if lp is not None:
                    pre = logprobs_of(c, i, True)
                    lp = {k: pre[k] + lp[k] for k in lp}
            out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        used = sum(len(c.tokens) for c in choices.values())
        return {**head, "choices": out, "usage": _usage(n_prompt, used)}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        ids = _chat_ids(state, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        group = _Group(worker, [Job(_engine_request(state, ids, max_tokens, body, "messages", logprobs))])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = {**head, "object": "chat.completion.chunk"}
            extra = {"usage": None} if include_usage else {}

            def chunk(delta: dict, finish: str | None = None, lp: dict | None = None) -> str:
                return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                                  "finish_reason": finish}], **extra})  # fmt: skip

            async def stream() -> AsyncIterator[str]:
                c = _Choice()
                yield chunk({"role": "assistant", "content": ""})
                async for ev in group.events():
                    if ev.kind == "error":
                        yield _sse(error_body(500, ev.message))
                        break
                    c.add(ev.output)
                    out = ev.output
                    lp = None
                    if logprobs is not None and out.token is not None:
                        lp = _chat_logprobs(tok, [out.token], [out.logprob], [out.top_logprobs])
                    if out.text or lp is not None:
                        yield chunk({"content": out.text} if out.text else {}, None, lp)
                    if out.finished:
                        yield chunk({}, c.finish_reason)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(len(ids), len(c.tokens))})
                yield "data: [DONE]\n\n"

            return _EventStream(stream(), group.close)

        c = _Choice()
        try:
            async for ev in group.events(request):
                if ev.kind == "error":
                    raise APIError(500, ev.message)
                c.add(ev.output)
        finally:
            group.close()
        lp = _chat_logprobs(tok, c.tokens, c.logprobs, c.tops) if logprobs is not None else None
        message = {"role": "assistant", "content": "".join(c.text)}
        choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}
        return {**head, "choices": [choice], "usage": _usage(len(ids), len(c.tokens))}

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give either prompt (text) or messages (a conversation)", "prompt")
        if body.messages is not None:
            ids = _chat_ids(state, body)
        else:
            ids = tok.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        _check_ids(state, body.tokens, "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/health")
    async def health():
        e = worker.engine
        body = {"status": "ok" if worker.alive else "engine stopped", "model": state.model_name,
                "running": worker.running, "waiting": worker.waiting, "kv_pages_used": worker.pages_used,
                "kv_pages_total": e.pool.num_pages}  # fmt: skip
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

    app.add_middleware(_CountRequests, metrics=metrics)
    return app


class _CountRequests:
    """ASGI wrapper that counts every HTTP request by endpoint and status (mixq_requests_total)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(status[0])).inc()
