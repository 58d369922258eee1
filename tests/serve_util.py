"""A live `mixq serve` app on 127.0.0.1 for tests: uvicorn in a background thread over the embedded demo model."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

import mixq
from mixq.cli.demo import DEMO_DIR
from mixq.engine.generate import Engine
from mixq.serve.server import bind, make_server
from mixq.serve.worker import EngineWorker


@dataclass
class LiveServer:
    url: str
    worker: EngineWorker
    api_key: str | None
    model_name: str = "demo"

    @property
    def engine(self) -> Engine:
        return self.worker.engine

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once no request runs or waits and every KV page is back in the pool."""
        pool = self.engine.pool
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w = self.worker
            if w.running == 0 and w.waiting == 0 and w.pages_used == 0 and pool.free_pages == pool.num_pages:
                return True
            time.sleep(0.05)
        return False


def start_server(api_key: str | None = None, max_queue: int = 64, **engine_kwargs):
    """(LiveServer, stop function)."""
    model = mixq.load_model(DEMO_DIR, device="cpu", dtype=torch.float32)
    tok = mixq.load_tokenizer(DEMO_DIR)
    engine = Engine(model, tok, **engine_kwargs)
    sock = bind("127.0.0.1", 0)
    server, worker = make_server(engine, tok, "demo", api_key=api_key, max_queue=max_queue)
    worker.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = sock.getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        worker.stop()
        sock.close()

    return LiveServer(f"http://127.0.0.1:{port}", worker, api_key), stop
