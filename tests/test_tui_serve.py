"""`memtui serve`: textual-serve runs the app per browser tab; loopback by default, a warning otherwise."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import memtui.cli.serve as serve
from memtui.cli import main


class FakeServer:
    instances: list[FakeServer] = []

    def __init__(self, command, host="localhost", port=8000, title=None, public_url=None, **kwargs):
        self.command, self.host, self.port, self.title, self.public_url = command, host, port, title, public_url
        self.served = False
        FakeServer.instances.append(self)

    def serve(self, debug=False):
        self.served = True

    def request_exit(self):
        raise AssertionError("no signal arrives in these tests")


@pytest.fixture
def fake_server(monkeypatch):
    """textual-serve's Server replaced by a recorder; the address check too (hosts of other machines)."""
    import textual_serve.server

    FakeServer.instances.clear()
    monkeypatch.setattr(textual_serve.server, "Server", FakeServer)
    monkeypatch.setattr(serve, "check_address", lambda host, port: None)
    return FakeServer


def test_serves_the_app_on_loopback_by_default_without_warning(fake_server, capsys):
    assert main(["serve"]) == 0
    (server,) = fake_server.instances
    assert server.served and server.host == "127.0.0.1" and server.port == 8000
    assert server.public_url == "http://127.0.0.1:8000"
    assert server.title == "memtui"
    assert shlex.split(server.command) == ["exec", sys.executable, "-P", "-m", "memtui"]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "workshop.example.org", "::"])
def test_binding_elsewhere_warns(fake_server, capsys, host):
    assert main(["serve", "--host", host, "--port", "8080"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"memtui: warning: listening on {host}")
    (server,) = fake_server.instances
    assert server.host == host and server.port == 8080
    if host in ("0.0.0.0", "::"):
        assert "0.0.0.0" not in server.public_url  # a browser cannot connect to a wildcard address


def test_public_url_can_be_given(fake_server):
    main(["serve", "--host", "0.0.0.0", "--public-url", "https://memtui.example.org"])
    assert fake_server.instances[0].public_url == "https://memtui.example.org"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert serve.is_loopback(host)


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_a_bad_port_is_one_line_and_exit_2(capsys, port):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", port])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memtui: error: --port:")


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--host" in out and "--port" in out and "--public-url" in out and "warning" in out


def test_the_served_command_exists():
    """The command each browser tab runs is `exec python -P -m memtui`: check that entry point answers."""
    out = subprocess.run(serve.app_command() + " --version", shell=True, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.startswith("memtui ")


# ---- the address: one line, exit 2 -------------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("memtui: error: "), (code, out, err)
    return lines[0]


def test_a_port_in_use_is_one_line_and_exit_2(monkeypatch, capsys):
    import textual_serve.server

    monkeypatch.setattr(textual_serve.server, "Server", FakeServer)  # never serves, whatever happens
    FakeServer.instances.clear()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(capsys, ["serve", "--port", str(port)])
    assert line == f"memtui: error: --port: port {port} is already in use on 127.0.0.1; choose another with --port"
    assert not FakeServer.instances


@pytest.mark.parametrize(("host", "expected"), [
    ("no-such-host.invalid", "--host: cannot resolve 'no-such-host.invalid'"),
    ("192.0.2.1", "--host: cannot listen on '192.0.2.1'"),  # TEST-NET-1: an address of no machine here
])
def test_a_host_that_cannot_be_listened_on_is_one_line_and_exit_2(monkeypatch, capsys, host, expected):
    import textual_serve.server

    monkeypatch.setattr(textual_serve.server, "Server", FakeServer)
    FakeServer.instances.clear()
    line = one_line_error(capsys, ["serve", "--host", host, "--port", "8765"])
    assert expected in line
    assert not FakeServer.instances


# ---- the page needs no internet --------------------------------------------------------------------------------

def test_the_page_loads_its_font_from_the_server_not_the_internet():
    import textual_serve

    page = (serve.TEMPLATES_PATH / "app_index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis" not in page and "https://" not in page
    static = Path(textual_serve.__file__).parent / "static"
    for font in ("RobotoMono-VariableFont_wght.ttf", "RobotoMono-Italic-VariableFont_wght.ttf"):
        assert "{{ config.static.url }}fonts/" + font in page and (static / "fonts" / font).is_file()
    server = serve.server_class()("true")
    assert Path(server.templates_path) == serve.TEMPLATES_PATH and Path(server.statics_path) == static


# ---- the apps end with their session -----------------------------------------------------------------------

SERVED_ENV = dict(os.environ, TEXTUAL_DRIVER="textual.drivers.web_driver:WebDriver", MEMTUI_NO_GPU_DETECT="1",
                  COLUMNS="120", ROWS="40")


def memtui_apps() -> list[psutil.Process]:
    """Per-browser app processes of this checkout's Python, wherever they were reparented."""
    command = [sys.executable, "-P", "-m", "memtui"]
    apps = []
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] == command:
            apps.append(process)
    return apps


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [process for process in alive if process.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(60)
def test_sigterm_to_the_process_textual_serve_started_ends_the_app():
    """textual-serve starts the command with a shell and signals the pid it gets: that must be the app."""

    async def scenario() -> bool:
        process = await asyncio.create_subprocess_shell(
            serve.app_command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=SERVED_ENV)
        try:
            assert await asyncio.wait_for(process.stdout.readline(), 30) == b"__GANGLION__\n"
            await asyncio.sleep(1)
            process.send_signal(signal.SIGTERM)

            async def until_eof() -> None:  # every writer of the app's stdout is gone
                while await process.stdout.read(65536):
                    pass

            try:
                await asyncio.wait_for(until_eof(), 10)
                return True
            except asyncio.TimeoutError:
                return False
        finally:
            for leftover in psutil.Process().children(recursive=True):
                leftover.kill()
            await process.wait()

    assert asyncio.run(scenario()), "the app outlived SIGTERM to the process textual-serve started"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, int, set[int]]:
    """A fresh `memtui serve` on a free loopback port, and the memtui apps that ran before it."""
    before = {process.pid for process in memtui_apps()}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-P", "-m", "memtui", "serve", "--port", str(port)],
                              env=SERVED_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return server, port, before


def apps_started(server: subprocess.Popen, before: set[int]) -> list[psutil.Process]:
    return [process for process in memtui_apps() if process.pid not in before and process.pid != server.pid]


async def open_session(port: int):
    """A browser's websocket to a fresh `memtui serve`; returns (client session, websocket, the app's process)."""
    import aiohttp

    client = aiohttp.ClientSession()
    for _ in range(150):
        try:
            async with client.get(f"http://127.0.0.1:{port}/"):
                break
        except aiohttp.ClientError:
            await asyncio.sleep(0.2)
    websocket = await client.ws_connect(f"http://127.0.0.1:{port}/ws?width=120&height=40")
    await asyncio.wait_for(websocket.receive(), 30)  # the app's first screen bytes
    return client, websocket


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_the_apps_end_when_the_server_stops(stop):
    server, port, before = start_server()

    async def scenario() -> list[psutil.Process]:
        client, websocket = await open_session(port)
        try:
            apps = apps_started(server, before)
            assert apps, "no app started for the browser session"
            server.send_signal(stop)
            server.wait(30)
            return wait_gone(apps, timeout=10)
        finally:
            await client.close()

    try:
        left = asyncio.run(scenario())
    finally:
        if server.poll() is None:
            server.kill()
    for process in left:
        process.kill()
    assert not left, f"apps outlived the server stopped by {stop.name}: {[p.pid for p in left]}"
    if stop != signal.SIGKILL:
        assert server.returncode == 0


@pytest.mark.timeout(120)
def test_the_app_ends_when_its_browser_disconnects():
    server, port, before = start_server()

    async def scenario() -> list[psutil.Process]:
        client, websocket = await open_session(port)
        apps = apps_started(server, before)
        assert apps
        await websocket.close()
        await client.close()
        return wait_gone(apps, timeout=10)

    try:
        left = asyncio.run(scenario())
        assert server.poll() is None  # the server serves on
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    for process in left:
        process.kill()
    assert not left


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_in_a_terminal_the_app_ends_cleanly_on_sigterm_and_sighup(signum):
    """Not killed mid-frame: it leaves the alternate screen (the terminal is usable again) and exits 128+N."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the app in a terminal of its own
        os.environ.update(MEMTUI_NO_GPU_DETECT="1", COLUMNS="120", LINES="40", TERM="xterm-256color")
        os.execv(sys.executable, [sys.executable, "-P", "-m", "memtui"])
    output = b""

    def read_for(seconds: float) -> None:
        nonlocal output
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the app is gone and the terminal closed
                    return
                if not chunk:
                    return
                output += chunk

    status = None
    try:
        for _ in range(60):  # the budget and the inputs drawn (a quit during that mount is another matter)
            read_for(1)
            if b"GiB" in output and b"Seq length" in output:
                break
        for _ in range(10):  # then quiet: the lazily mounted inputs have settled
            before = len(output)
            read_for(1)
            if len(output) == before:
                break
        mark = len(output)
        os.kill(pid, signum)
        read_for(10)
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert b"\x1b[?1049l" in output[mark:], "the app did not leave the alternate screen"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signum, output[mark:].decode(errors="replace")[-3000:]
