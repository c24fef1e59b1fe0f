"""`memtui estimate`: the analytic budget, as a table or one JSON object."""

from __future__ import annotations

import argparse
import json

from memtui.cli.options import add_training_flags, config_from_args, with_file_notes

HELP = "predict one training step's memory per GPU (analytic; the reserved peak from the allocator replay)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate", help=HELP, description=HELP,
        epilog="example: memtui estimate --model llama-3.1-8b --gpu a100-80gb --precision 32-true --json",
    )
    add_training_flags(parser)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    replay = parser.add_argument_group("caching allocator replay")
    replay.add_argument("--alloc-conf", default=None, metavar="CONF",
                        help="PYTORCH_CUDA_ALLOC_CONF to replay the reserved peak with (default: torch's defaults), "
                             "e.g. expandable_segments:True")
    replay.add_argument("--seq-lens", default=None, metavar="LENS",
                        help="each replayed step's sequence length: a list cycled through (512,1024,2048) or "
                             "uniform:MIN-MAX (default: --seq-len for every step)")
    replay.add_argument("--steps", default="1", metavar="N",
                        help="steps replayed after the first, which makes the optimizer states, 1..64 (default 1: "
                             "the two steps memtui trace runs)")
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
    from memtui.engine.allocator import parse_alloc_conf
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.reserved import check_seq_lens, parse_seq_lens, parse_steps, with_reserved
    from memtui.engine.model.presets import resolve_gpu, resolve_model

    steps = parse_steps(args.steps)
    seq_lens = parse_seq_lens(args.seq_lens, steps) if args.seq_lens is not None else None
    alloc_config = parse_alloc_conf(args.alloc_conf)
    config = config_from_args(args)
    derive_generic_if_needed(config)
    model, gpu = resolve_model(config.model), resolve_gpu(config.gpu)
    budget = estimate(config, model=model, gpu=gpu)
    if seq_lens is not None:
        check_seq_lens(seq_lens, config, model, gpu)
    budget = with_reserved(budget, config, model, gpu, alloc_config=alloc_config, seq_lens=seq_lens, steps=steps)
    budget = with_file_notes(budget, args)
    if args.json:
        print(json.dumps(budget.model_dump(mode="json"), indent=2))
    else:
        from memtui.cli.render import print_budget

        print_budget(budget)
    return 0
