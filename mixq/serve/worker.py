"""One thread owns the Engine and steps it; HTTP handlers talk to it through queues.

Handlers `submit` jobs and `abort` them through a thread-safe inbox; the engine thread drains the inbox between
steps (so a new request joins the running batch at the next step, and an abort frees its pages within one step),
then hands each sampled token to its request's asyncio queue with `loop.call_soon_threadsafe`. Neither side ever
waits on the other: a slow client only lets its own queue grow.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from mixq.engine.evaluate import prompt_logprobs
from mixq.engine.generate import Engine, Output, Request
from mixq.errors import MixqError
from mixq.serve.metrics import Metrics

log = logging.getLogger("mixq")


class QueueFull(Exception):
    """More requests wait than --max-queue allows (HTTP 503)."""


@dataclass
class Event:
    """What the engine thread tells a handler: a sampled token, the prompt's logprobs (echo) or an error."""

    kind: str  # "token", "prompt" or "error"
    index: int  # the choice this job answers (a completion request may carry several prompts)
    output: Output | None = None
    prompt_logprobs: tuple[list, list] | None = None
    message: str = ""


@dataclass
class Job:
    request: Request
    sink: asyncio.Queue | None = None  # set by the handler that submits it
    loop: asyncio.AbstractEventLoop | None = None
    index: int = 0
    echo_logprobs: int | None = None  # score the prompt first (OpenAI's echo with logprobs), top-N
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int = 256, metrics: Metrics | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.metrics = metrics or Metrics(engine.pool.num_pages)
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._in_inbox = 0  # jobs submitted, not yet handed to the engine
        self._engine_waiting = 0  # published after each step: len(engine.waiting)
        self.running = 0
        self.pages_used = 0
        self._jobs: dict[int, Job] = {}  # engine thread only
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixq-engine", daemon=True)

    # --- called from the HTTP side (any thread) ---

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._in_inbox + self._engine_waiting

    def submit(self, job: Job) -> int:
        """Queue a job for the engine; raises QueueFull when --max-queue requests already wait."""
        with self._lock:
            if self._in_inbox + self._engine_waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (--max-queue)")
            self._in_inbox += 1
            job.request.request_id = next(self._ids)
        self._inbox.put(("add", job))
        return job.request.request_id

    def abort(self, request_id: int) -> None:
        """Stop a request (client gone or stop pressed); a finished or unknown id is ignored."""
        self._inbox.put(("abort", request_id))

    # --- the engine thread ---

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._drain(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._step()
            except Exception:  # a bug in the loop itself: log it and keep serving
                log.exception("mixq serve: engine loop error")
            self._publish()
        for rid in list(self._jobs):
            self._fail(rid, "the server is shutting down")

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self._abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, job: Job) -> None:
        req = job.request
        try:
            if job.echo_logprobs is not None:
                scored = prompt_logprobs(self.engine.model, req.prompt_ids, job.echo_logprobs)
                self._send(job, Event("prompt", job.index, prompt_logprobs=scored))
            self.engine.add(req)
            self._jobs[req.request_id] = job
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        except Exception as e:  # this request only; the loop goes on
            if not isinstance(e, MixqError):
                log.exception("mixq serve: request %s failed", req.request_id)
            self._send(job, Event("error", job.index, message=str(e) or type(e).__name__))
        finally:
            with self._lock:
                self._in_inbox -= 1
                self._engine_waiting = len(self.engine.waiting)

    def _abort(self, rid: int) -> None:
        if self._jobs.pop(rid, None) is not None:
            self.engine.abort(rid)
            self.metrics.aborted.inc()

    def _fail(self, rid: int, message: str) -> None:
        job = self._jobs.pop(rid, None)
        self.engine.abort(rid)
        if job is not None:
            self._send(job, Event("error", job.index, message=message))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # The step's batch may be half-updated: end the requests that were in it, keep the loop and the rest.
            log.exception("mixq serve: engine step failed")
            for seq in list(self.engine.running):
                self._fail(seq.req.request_id, f"internal error while generating: {type(e).__name__}: {e}")
            return
        self._publish()  # admissions first, so a handler that sees this step's tokens also sees the queue they left
        now = time.perf_counter()
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None:
                continue
            if out.token is not None:
                self.metrics.generation_tokens.inc()
                if job.last_token is None:
                    self.metrics.ttft.observe(now - job.submitted)
                else:
                    self.metrics.itl.observe(now - job.last_token)
                job.last_token = now
            if out.finished:
                del self._jobs[out.request_id]
            if out.finish_reason == "error":  # the engine ended this request (e.g. non-finite logits)
                self._send(job, Event("error", job.index, message=out.error or "generation failed"))
                continue
            if not self._send(job, Event("token", job.index, output=out)):
                self._abort(out.request_id)

    def _send(self, job: Job, event: Event) -> bool:
        try:
            job.loop.call_soon_threadsafe(job.sink.put_nowait, event)
            return True
        except RuntimeError:  # the handler's event loop is closed: nobody is listening
            return False

    def _publish(self) -> None:
        e = self.engine
        with self._lock:
            self._engine_waiting = len(e.waiting)
            self.running = len(e.running)
            self.pages_used = e.pool.num_pages - e.pool.free_pages
            waiting = self._in_inbox + self._engine_waiting
        self.metrics.running.set(self.running)
        self.metrics.waiting.set(waiting)
        self.metrics.pages_used.set(self.pages_used)
