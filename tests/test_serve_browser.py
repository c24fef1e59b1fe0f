"""`memtui serve` in a real browser: Debian's chromium, driven by playwright, on the loopback interface only.

Open the page, see the app start and draw its budget, switch the model through the palette (ctrl+p), close
the tab, stop the server: no memtui process is left, and the page asked nothing of the internet.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.test_tui_serve import apps_started, memtui_apps, start_server, wait_gone

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(),
        reason="chromium is not installed (apt-get install chromium; .ci/run installs it when running as root)",
    ),
    pytest.mark.timeout(120),
]

ESCAPES = re.compile(rb"\x1b(\[[0-9;?<=>]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>NOM78])")


class Screen:
    """The text of every frame the page's websocket received (escape sequences dropped)."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    def receive(self, payload: str | bytes) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.frames.append(ESCAPES.sub(b"", data).decode("utf-8", errors="replace"))

    def text(self, since: int = 0) -> str:
        return "".join(self.frames[since:])

    def wait_for(self, page, text: str, since: int = 0, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text(since):
            assert time.monotonic() < deadline, f"{text!r} never reached the page"
            page.wait_for_timeout(100)


def test_the_planner_in_chromium_from_start_to_a_clean_stop():
    sync_api = pytest.importorskip("playwright.sync_api")
    server, port, before = start_server()
    url = f"http://127.0.0.1:{port}/"
    outside: list[str] = []
    screen = Screen()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})

            def only_loopback(route) -> None:
                if route.request.url.startswith(f"http://127.0.0.1:{port}/"):
                    route.continue_()
                else:  # the page must work without internet: record what it tried, answer nothing
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_loopback)
            page.on("websocket", lambda websocket: websocket.on("framereceived", screen.receive))
            for _ in range(100):  # the server takes a moment to listen
                try:
                    page.goto(url, wait_until="load")
                    break
                except sync_api.Error:
                    page.wait_for_timeout(200)
            screen.wait_for(page, "GiB")  # the app started and drew its budget
            screen.wait_for(page, "Seq length")  # and its inputs
            apps = apps_started(server, before)
            assert len(apps) == 1, "one app process per browser tab"

            page.locator(".textual-terminal").click()
            mark = len(screen.frames)
            page.keyboard.press("Control+p")
            screen.wait_for(page, "Model:", since=mark)  # the palette lists the presets
            page.keyboard.type("Model: GPT-2", delay=20)
            page.wait_for_timeout(500)
            mark = len(screen.frames)
            page.keyboard.press("Enter")
            screen.wait_for(page, "(gpt2)", since=mark)  # the model picker now shows GPT-2

            page.close()  # the tab goes: its app ends, the server serves on
            assert not wait_gone(apps, timeout=15), "the app outlived its closed tab"
            assert server.poll() is None
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    leftovers = [process for process in memtui_apps() if process.pid not in before]
    for process in leftovers:
        process.kill()
    assert server.returncode == 0
    assert not leftovers, "memtui processes left after the server stopped"
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    assert outside == [], f"the page asked the internet for {outside}"
