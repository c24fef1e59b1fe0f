"""The `memtui` command: the TUI with no arguments, subcommands for everything headless."""

from __future__ import annotations

import argparse
import importlib
import sys

from memtui import __version__
from memtui.engine.errors import InputError

# Subcommand modules, imported only to build the parser; heavy work is imported in run().
_COMMANDS = ("estimate", "trace", "run", "fit", "presets_cmd", "validate", "serve", "replay")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, as everywhere in memtui."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's "argument --x: --x: ..." repeats the flag our type parsers already name.
        if message.startswith("argument ") and ": --" in message:
            message = message.split(": ", 1)[1]
        self.exit(2, f"memtui: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="memtui",
        description="GPU memory planner for training: predict, trace and measure one step's memory per GPU.",
        epilog="Run `memtui` with no arguments for the interactive planner.",
    )
    parser.add_argument("--version", action="version", version=f"memtui {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=OneLineParser)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"memtui.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"memtui.cli.{name}":
                continue  # command not built in this checkout
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from memtui.tui.app import run_app

        return run_app()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return handler(args)
    except InputError as error:
        print(f"memtui: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memtui: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
