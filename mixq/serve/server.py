"""Bind, start the engine thread, run uvicorn, and say where the server listens once it accepts connections."""

from __future__ import annotations

import socket
import sys

import uvicorn

from mixq.engine.generate import Engine
from mixq.errors import MixqError
from mixq.model.tokenizer import Tokenizer
from mixq.serve.app import ServeState, create_app
from mixq.serve.worker import EngineWorker


class _Server(uvicorn.Server):
    """uvicorn, plus one line with the URL once the sockets accept connections."""

    on_ready = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()


def bind(host: str, port: int) -> socket.socket:
    """Listen on host:port (port 0: a free one), refusing clearly when the address is taken or invalid."""
    if not 0 <= port < 65536:
        raise MixqError(f"--port {port}: must be in 0..65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise MixqError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host or --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    api_key: str | None = None,
    max_queue: int = 256,
    log_level: str = "warning",
) -> tuple[_Server, EngineWorker]:
    """The uvicorn server and its engine worker (not started: `worker.start()`, then `server.run(sockets=[sock])`)."""
    if max_queue < 1:
        raise MixqError(f"--max-queue {max_queue}: must be at least 1")
    worker = EngineWorker(engine, max_queue)
    app = create_app(ServeState(worker, tokenizer, model_name, api_key))
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    return _Server(config), worker


def serve(engine: Engine, tokenizer: Tokenizer, model_name: str, host: str, port: int, **kwargs) -> None:
    sock = bind(host, port)
    server, worker = make_server(engine, tokenizer, model_name, **kwargs)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host

    def ready() -> None:
        print(f"mixq: serving {model_name} at http://{shown}:{bound_port} (OpenAI API under /v1, chat page at /)")
        sys.stdout.flush()

    server.on_ready = ready
    worker.start()
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
