"""`memtui serve`: the planner in a web browser, through textual-serve.

Each browser tab gets its own `memtui` process. The server listens on the
loopback interface unless told otherwise: anyone who can reach the port gets
a memtui session (which can start live runs on this machine's GPU), so
binding elsewhere prints a warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import socket
import sys

from memtui.engine.python_command import python_module

HELP = "serve the planner in a web browser (for workshops and remote machines)"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


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
    """The shell command textual-serve runs for each browser session: this Python, `memtui` with no arguments."""
    return shlex.join(python_module("memtui"))


def public_url(host: str, port: int) -> str:
    """Where a browser should connect; a wildcard address is not one, so use this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal in a URL
    return f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    if not is_loopback(args.host):
        print(
            f"memtui: warning: listening on {args.host}: anyone who can reach port {args.port} gets a memtui "
            "session on this machine, with no password. Prefer the default host and an SSH tunnel.",
            file=sys.stderr,
        )
    from textual_serve.server import Server

    server = Server(
        app_command(),
        host=args.host,
        port=args.port,
        title="memtui",
        public_url=args.public_url or public_url(args.host, args.port),
    )
    server.serve()
    return 0
