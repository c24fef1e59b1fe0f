"""The `memtui` command: the TUI (on a configuration, if given), subcommands for everything headless."""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from memtui import __version__
from memtui.engine.errors import InputError
from memtui.engine.process_exit import exit_process

# Subcommand modules, imported only to build the parser; heavy work is imported in run().
_COMMANDS = ("estimate", "trace", "run", "fit", "presets_cmd", "validate", "serve", "replay")
_COMMAND_NAMES = {name.removesuffix("_cmd") for name in _COMMANDS}


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
        epilog="Run `memtui` with no arguments (or `memtui MODEL`, or the estimate flags) for the interactive planner.",
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


def opens_the_planner(argv: list[str]) -> bool:
    """`memtui`, `memtui MODEL`, `memtui path/config.json`, `memtui --model gpt2 --lora-rank 8`: not a command."""
    return not argv or (argv[0] not in _COMMAND_NAMES and argv[0] not in ("-h", "--help", "--version"))


def planner_parser() -> argparse.ArgumentParser:
    from memtui.cli.options import add_training_flags

    parser = OneLineParser(
        prog="memtui",
        description="The interactive planner, opened on this configuration (the estimate flags).",
        epilog=f"Commands: {', '.join(sorted(_COMMAND_NAMES))}; `memtui --help` lists them.",
    )
    parser.add_argument("target", nargs="?", metavar="MODEL",
                        help="a model preset id, or a path to a config.json (or its folder); same as --model; "
                             "a .yaml/.toml training config: same as --from")
    add_training_flags(parser)
    return parser


def open_planner(argv: list[str]) -> int:
    """The planner on the configuration the arguments describe; a bad one is the usual one-line error."""
    from memtui.cli.options import config_from_args

    config = None
    gpu_chosen = False
    if argv:
        parser = planner_parser()
        args = parser.parse_args(argv)
        if args.target is not None and args.target.lower().endswith((".yaml", ".yml", ".toml")):
            if args.from_file is not None:
                parser.error(f"give the training config once: {args.target!r} or --from {args.from_file}")
            args.from_file, args.target = args.target, None  # `memtui FILE`: a framework's training config
        if args.target is not None:
            if args.model is not None:
                parser.error(f"give the model once: {args.target!r} or --model {args.model}")
            args.model = args.target
        config = config_from_args(args)
        gpu_chosen = args.gpu is not None or args.recipe is not None
        from memtui.cli.estimate import derive_generic_if_needed

        derive_generic_if_needed(config)  # a generic model's traced layers, before the planner (which has no torch)
    # Start-up allocates many objects and frees almost none: no collections until the first frame (the app
    # turns the collector back on once it is drawn).
    gc.disable()
    from memtui.tui.app import run_app

    return run_app(config, gpu_chosen=gpu_chosen)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if opens_the_planner(argv):
        try:
            return open_planner(argv)
        except InputError as error:
            # `memtui estimat` reads as a model name: say what the commands are, on the same line.
            commands = f"; commands: {', '.join(sorted(_COMMAND_NAMES))}" if not argv[0].startswith("-") else ""
            print(f"memtui: error: {error}{commands}", file=sys.stderr)
            return 2
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


def entry() -> None:
    """The installed `memtui` script: main(), then an exit that skips tearing torch down where it was imported."""
    exit_process(main())


if __name__ == "__main__":
    entry()
