"""`memtui estimate`: the analytic budget, as a table or one JSON object."""

from __future__ import annotations

import argparse
import json

from memtui.cli.options import add_training_flags, config_from_args, with_file_notes

HELP = "predict one training step's memory per GPU (analytic, instant)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate", help=HELP, description=HELP,
        epilog="example: memtui estimate --model llama-3.1-8b --gpu a100-80gb --precision 32-true --json",
    )
    add_training_flags(parser)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from memtui.engine.estimator import estimate

    budget = with_file_notes(estimate(config_from_args(args)), args)
    if args.json:
        print(json.dumps(budget.model_dump(mode="json"), indent=2))
    else:
        from memtui.cli.render import print_budget

        print_budget(budget)
    return 0
