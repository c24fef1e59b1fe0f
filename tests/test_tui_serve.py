"""`memtui serve`: textual-serve runs the app per browser tab; loopback by default, a warning otherwise."""

from __future__ import annotations

import shlex
import subprocess
import sys

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


@pytest.fixture
def fake_server(monkeypatch):
    import textual_serve.server

    FakeServer.instances.clear()
    monkeypatch.setattr(textual_serve.server, "Server", FakeServer)
    return FakeServer


def test_serves_the_app_on_loopback_by_default_without_warning(fake_server, capsys):
    assert main(["serve"]) == 0
    (server,) = fake_server.instances
    assert server.served and server.host == "127.0.0.1" and server.port == 8000
    assert server.public_url == "http://127.0.0.1:8000"
    assert server.title == "memtui"
    assert shlex.split(server.command) == [sys.executable, "-P", "-m", "memtui"]
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
    """The command each browser tab runs is `python -m engine`: check that entry point answers."""
    command = shlex.split(serve.app_command())
    out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith("memtui ")
