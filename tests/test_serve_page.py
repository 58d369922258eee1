"""The chat page at GET / in a real headless browser (Debian's chromium driven by playwright): type a message, see
the streamed text appear, press stop (the server aborts the request), then a whole answer with its tokens/s.
A screenshot is kept under pytest's tmp_path and copied to bench/out/ (git-ignored)."""

from __future__ import annotations

import os
import random
import shutil
import time

import httpx
import pytest
from serve_util import start_server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "out")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def live():
    server, stop = start_server(max_batch=4, max_seq_len=512)
    yield server
    stop()


def test_chat_page_streams_stops_and_reports_speed(live, tmp_path, monkeypatch):
    page_html = httpx.get(live.url + "/").text
    assert "<script>" in page_html and "http://" not in page_html and "https://" not in page_html  # offline
    # Answers run to max_tokens (no EOS) and a step takes at least 30 ms, so the stop button meets a live stream.
    monkeypatch.setattr(live.engine, "eos_ids", [])
    model = live.engine.model
    real_forward = model.forward_tokens
    monkeypatch.setattr(model, "forward_tokens", lambda *a, **k: (time.sleep(0.03), real_forward(*a, **k))[1])

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(live.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text(live.model_name)
            page.fill("#system", "You are a helpful assistant.")
            page.fill("#max-tokens", "400")
            words = " ".join(random.sample(["tell", "me", "a", "story", "about", "the", "sea", "and", "ships"], 5))
            page.fill("#input", words.capitalize())
            page.press("#input", "Enter")
            answer = page.locator(".assistant").first
            sync_api.expect(page.locator(".user").first).to_have_text(words.capitalize())
            page.wait_for_function("document.querySelector('.assistant').textContent.length > 15", timeout=60_000)
            assert page.is_enabled("#stop") and not page.is_enabled("#send")  # still streaming
            page.click("#stop")
            sync_api.expect(answer.locator(".meta")).to_contain_text("stopped", timeout=30_000)
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            assert live.wait_idle(10)  # the browser's abort reached the engine: nothing runs, every page is free

            page.fill("#max-tokens", "6")
            page.fill("#input", "And then?")
            page.press("#input", "Enter")
            second = page.locator(".assistant").nth(1)
            sync_api.expect(second.locator(".meta")).to_contain_text("tokens/s", timeout=60_000)
            sync_api.expect(second.locator(".meta")).to_contain_text("6 tokens")
            assert len(second.inner_text()) > 0
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot))
            os.makedirs(OUT, exist_ok=True)
            shutil.copy(shot, os.path.join(OUT, "chat_page.png"))
            assert all(u.startswith(live.url) for u in requests), requests  # nothing fetched from elsewhere
        finally:
            browser.close()
