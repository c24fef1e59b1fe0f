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


def derive_generic_if_needed(config) -> None:
    """A generic model (a model_type memtui does not replay) traces its layers once per option set, with
    progress on stderr; later estimates read the cached program."""
    import sys

    from memtui.engine.model.generic import needs_derivation
    from memtui.engine.model.presets import resolve_model

    model = resolve_model(config.model)
    if not needs_derivation(model, config):
        return
    from memtui.engine.trace.generic import derive_program

    def progress(stage: str, fraction: float) -> None:
        print(f"memtui: generic model {model.id}: {stage} ({100 * fraction:.0f}%)", file=sys.stderr, flush=True)

    # On a terminal only: a script reading stderr gets one line, the error's, when there is one.
    derive_program(model, config, progress if sys.stderr.isatty() else None)


def run(args: argparse.Namespace) -> int:
    from memtui.engine.estimator import estimate

    config = config_from_args(args)
    derive_generic_if_needed(config)
    budget = with_file_notes(estimate(config), args)
    if args.json:
        print(json.dumps(budget.model_dump(mode="json"), indent=2))
    else:
        from memtui.cli.render import print_budget

        print_budget(budget)
    return 0
