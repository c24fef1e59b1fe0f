"""`memtui fit`: the largest batch and sequence that fit, the fewest GPUs, and what to enable to fit."""

from __future__ import annotations

import argparse
import json

from memtui.cli.options import add_training_flags, config_from_args, file_notes, print_file_notes

HELP = "find the largest batch / sequence that fits, the fewest GPUs, and what to enable to make it fit"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit", help=HELP, description=HELP + ". With no question flag, answers all four.",
        epilog="example: memtui fit --model llama-3.1-70b --gpu rtx-4090 --suggest",
    )
    add_training_flags(parser)
    group = parser.add_argument_group("questions (default: all four)")
    group.add_argument("--max-batch", action="store_true", help="largest micro-batch per data-parallel rank that fits")
    group.add_argument("--max-seq", action="store_true", help="longest sequence that fits at the given batch")
    group.add_argument("--min-gpus", action="store_true", help="fewest GPUs that fit (tp and pp kept; more data-parallel ranks)")
    group.add_argument("--suggest", action="store_true", help="the least invasive options to enable so it fits")
    group = parser.add_argument_group("question settings")
    group.add_argument("--zero-for-gpus", type=_zero_stage, metavar="N",
                       help="ZeRO stage for --min-gpus (default: --zero when it is 1-3, else 3)")
    group.add_argument("--seq-multiple", type=_seq_multiple, metavar="N",
                       help="round --max-seq down to a multiple of N, e.g. 128 (default 1)")
    group.add_argument("--margin", type=_margin, metavar="PERCENT",
                       help="share of the card --suggest leaves free, in percent (default 5)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.set_defaults(handler=run)


def _seq_multiple(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seq-multiple: {text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--seq-multiple: must be at least 1, got {value}")
    return value


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--margin: {text!r} is not a number (allowed: 0 to under 100)") from None
    if not 0 <= value < 100:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"--margin: {text} is not a percentage to leave free (allowed: 0 to under 100)")
    return value / 100


def _zero_stage(text: str) -> int:
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"--zero-for-gpus: {text!r} is not a valid choice (allowed: 0, 1, 2, 3)")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from memtui.engine.planning.fit import DEFAULT_MARGIN, fit_report

    from memtui.cli.estimate import derive_generic_if_needed

    config = config_from_args(args)
    derive_generic_if_needed(config)  # a generic model: its traced program for these options, once
    asked = (args.max_batch, args.max_seq, args.min_gpus, args.suggest)
    everything = not any(asked)
    report = fit_report(
        config,
        max_batch=everything or args.max_batch,
        max_seq=everything or args.max_seq,
        gpus=everything or args.min_gpus,
        suggestion=everything or args.suggest,
        zero=args.zero_for_gpus,
        seq_multiple=args.seq_multiple or 1,
        margin=DEFAULT_MARGIN if args.margin is None else args.margin,
    )
    if args.json:
        data = report.as_json()
        if file_notes(args):
            data["notes"] = file_notes(args)
        print(json.dumps(data, indent=2))
    else:
        print_file_notes(args)
        print_fit_report(report)
    return 0


# ---- readable output ------------------------------------------------------


def _command(config) -> str:
    """The `memtui estimate` line for config: every option that differs from the defaults."""
    from memtui.engine.model.options import OPTIONS
    from memtui.engine.model.specs import TrainingConfig
    from memtui.engine.planning.fit.suggestion import flag_text

    from memtui.engine.model.stacks import STACK_FIELDS, stack_defaults

    # What the command would give without a flag: memtui's default, or the stack's for the options it sets.
    defaults = TrainingConfig().model_dump()
    defaults.update(stack_defaults(config.stack, config.model_dump(), unset=STACK_FIELDS)[0])
    parts = ["memtui estimate"]
    for name in TrainingConfig.model_fields:
        option, value = OPTIONS[name], getattr(config, name)
        if value == defaults[name] and name not in ("model", "gpu", "batch_size", "seq_len"):
            continue
        parts.append(flag_text(option.flag, value))
    return " ".join(parts)


def print_fit_report(report, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from memtui.engine.planning.fit.suggestion import flag_text
    from memtui.engine.units import format_gib

    console = console or Console()
    config, budget = report.config, report.budget
    verdict = "[bold green]fits[/]" if budget.fits else "[bold red]does not fit[/]"
    console.print(
        f"[bold]{escape(budget.model.id)}[/] on {config.gpus}x {budget.gpu.id} ({format_gib(budget.gpu.memory_bytes)}) · "
        f"{config.precision} · batch {config.batch_size} x {config.seq_len} tokens: "
        f"peak {format_gib(budget.device_peak_bytes)}, {verdict}"
    )
    table = Table(show_header=True, title_justify="left", expand=False)
    table.add_column("Question")
    table.add_column("Answer", justify="right")
    table.add_column("Detail", overflow="fold")
    if report.max_batch is not None:
        result = report.max_batch
        answer = "none" if not result.fits else (f"≥ {result.batch_size:,}" if result.at_least else f"{result.batch_size:,}")
        table.add_row("Largest micro-batch", _colour(answer, result.fits), escape(result.message))
    if report.max_seq is not None:
        result = report.max_seq
        answer = "none" if not result.fits else (f"≥ {result.seq_len:,}" if result.at_least else f"{result.seq_len:,}")
        if result.limited_by == "model":
            answer += " (model max)"
        label = "Longest sequence" + (f" (x{result.multiple_of})" if result.multiple_of > 1 else "")
        table.add_row(label, _colour(answer, result.fits), escape(result.message))
    if report.min_gpus is not None:
        result = report.min_gpus
        answer = f"{result.gpus:,}" if result.fits else "none"
        table.add_row(f"Fewest GPUs (ZeRO-{result.zero})", _colour(answer, result.fits), escape(result.message))
    suggestion = report.suggestion
    if suggestion is not None:
        if suggestion.fits_already:
            answer = "nothing"
        elif suggestion.plan is not None:
            answer = f"{len(suggestion.plan.steps)} step" + ("s" if len(suggestion.plan.steps) != 1 else "")
        else:
            answer = "nothing fits"
        table.add_row("To make it fit", _colour(answer, suggestion.fits), escape(suggestion.message))
    console.print(table)

    if suggestion is None or suggestion.plan is None:
        return
    steps = Table(title="To make it fit, enable", title_justify="left", expand=False)
    steps.add_column("#", justify="right")
    steps.add_column("Step")
    steps.add_column("Sets", overflow="fold")
    steps.add_column("Peak after", justify="right")
    steps.add_column("Why", overflow="fold")
    for number, step in enumerate(suggestion.plan.steps, 1):
        sets = ", ".join(flag_text(flag, after) for flag, (_, after) in step.changes.items())
        peak = "?" if step.device_peak_bytes is None else format_gib(step.device_peak_bytes)
        steps.add_row(str(number), escape(step.title), escape(sets), peak, escape(step.reason))
    console.print(steps)
    console.print(f"try: [bold]{escape(_command(suggestion.plan.config))}[/]")
    for alternative in suggestion.alternatives:
        console.print(
            f"[dim]training as configured instead: {escape(alternative.summary)}, peak "
            f"{format_gib(alternative.budget.device_peak_bytes)}: {escape(_command(alternative.config))}[/]"
        )


def _colour(text: str, good: bool) -> str:
    return f"[green]{text}[/]" if good else f"[red]{text}[/]"
