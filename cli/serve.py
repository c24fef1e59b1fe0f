"""`memtui serve`: the planner in a web browser, through textual-serve.

Each browser tab gets its own `memtui` process, which ends when its tab
disconnects or the server stops (and on its own if the server is killed). The
server listens on the loopback interface unless told otherwise: anyone who can
reach the port gets a memtui session (which can start live runs on this
machine's GPU), so binding elsewhere prints a warning. The page needs no
internet: its font comes from textual-serve's own static folder.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import shlex
import signal
import socket
import sys
from pathlib import Path

from memtui.engine.errors import InputError
from memtui.engine.python_command import python_module

HELP = "serve the planner in a web browser (for workshops and remote machines)"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
APP_STOP_TIMEOUT = 5.0  # seconds the apps get to quit when the server stops, before they are killed
# textual-serve's page without its Google Fonts stylesheet (see the file's first lines).
TEMPLATES_PATH = Path(__file__).parent / "serve_templates"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port: {text!r} is not a whole number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port: {value} is out of range (allowed: 1..65535)")
    return value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help=HELP,
        description=HELP + ". Every browser tab runs its own memtui process.",
        epilog=(
            "examples: memtui serve    (then open http://127.0.0.1:8000)\n"
            "          memtui serve --host 0.0.0.0 --port 8080 --public-url http://workshop-box:8080\n"
            "Over SSH, prefer a tunnel to binding elsewhere: ssh -L 8000:127.0.0.1:8000 host"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST,
        help=f"interface to listen on (default {DEFAULT_HOST}, this machine only); "
             "anything else lets other machines in, with a warning",
    )
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--public-url",
        help="the address browsers use to reach the server (default http://HOST:PORT; "
             "for 0.0.0.0 this machine's host name)",
    )
    parser.set_defaults(handler=run)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it resolves to who knows what


def app_command() -> str:
    """The shell command textual-serve runs for each browser session: this Python, `memtui` with no arguments.

    `exec`: the process textual-serve starts, waits for and signals is the app itself, not a shell around it
    (dash forks, and a SIGTERM to the shell would leave the app running).
    """
    return "exec " + shlex.join(python_module("memtui"))


def check_address(host: str, port: int) -> None:
    """Fail before serving, in one line, when the host does not resolve or the port cannot be bound."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise InputError("--host", f"cannot resolve {host!r}: {error.strerror}") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                probe.bind(address)
            except OSError as error:
                raise _listen_error(host, port, error) from None


def _listen_error(host: str, port: int, error: OSError) -> InputError:
    if error.errno == errno.EADDRINUSE:
        return InputError("--port", f"port {port} is already in use on {host}; choose another with --port")
    if error.errno == errno.EACCES:
        return InputError("--port", f"port {port} needs privileges to listen on; choose one above 1023")
    return InputError("--host", f"cannot listen on {host!r}: {error.strerror or error}")


def end_leftover_apps(timeout: float = APP_STOP_TIMEOUT) -> None:
    """Terminate (then kill) this server's per-browser apps still running: the server stopped, so must they."""
    import psutil

    command = python_module("memtui")
    apps = []
    for child in psutil.Process().children():
        try:
            if child.cmdline() == command:
                apps.append(child)
        except psutil.Error:
            continue
    for app in apps:
        try:
            app.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(apps, timeout=timeout)
    for app in alive:
        try:
            app.kill()
        except psutil.Error:
            pass


def server_class() -> type:
    """textual-serve's Server, stopping every app it started when it stops, with a page that needs no internet."""
    from textual_serve.server import Server

    class MemtuiServer(Server):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, templates_path=TEMPLATES_PATH, **kwargs)
            self.sessions: set[asyncio.Task] = set()

        async def handle_websocket(self, request):
            session = asyncio.current_task()
            self.sessions.add(session)
            try:
                return await super().handle_websocket(request)
            finally:
                self.sessions.discard(session)

        async def on_shutdown(self, app) -> None:
            # A cancelled session sends its app textual-serve's "quit" and waits for it to exit; without
            # this, each open tab keeps the server (and its app) alive until the socket's heartbeat fails.
            # A second cancel ends a session still waiting for its browser to answer the close (up to 10 s);
            # an app that has not quit by then is terminated after the server stops (end_leftover_apps).
            sessions = list(self.sessions)
            for session in sessions:
                session.cancel()
            if sessions:
                _, pending = await asyncio.wait(sessions, timeout=APP_STOP_TIMEOUT)
                for session in pending:
                    session.cancel()

        def serve(self, debug: bool = False) -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)  # the loop Server.serve picks up and adds SIGINT/SIGTERM to
            loop.add_signal_handler(signal.SIGHUP, self.request_exit)  # a closed terminal stops it like Ctrl+C
            try:
                super().serve(debug)
            finally:
                loop.close()
                asyncio.set_event_loop(None)
                end_leftover_apps()

    return MemtuiServer


def public_url(host: str, port: int) -> str:
    """Where a browser should connect; a wildcard address is not one, so use this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal in a URL
    return f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    check_address(args.host, args.port)
    if not is_loopback(args.host):
        print(
            f"memtui: warning: listening on {args.host}: anyone who can reach port {args.port} gets a memtui "
            "session on this machine, with no password. Prefer the default host and an SSH tunnel.",
            file=sys.stderr,
        )
    server = server_class()(
        app_command(),
        host=args.host,
        port=args.port,
        title="memtui",
        public_url=args.public_url or public_url(args.host, args.port),
    )
    try:
        server.serve()
    except OSError as error:  # lost the port between the check and the bind
        raise _listen_error(args.host, args.port, error) from None
    return 0
