"""`memtui run`: train a scaled-down copy of the configuration for real, measured against its prediction."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from typing import Any

from memtui.cli.options import _choice, _positive_float, _positive_int, add_training_flags, config_from_args, print_file_notes

HELP = "train a scaled-down copy for a few steps and measure it against the prediction (live)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help=HELP,
        description=HELP + ". Takes the same flags as `memtui estimate`; the model is scaled down "
        "(fewer layers, narrower if needed) to fit the local device and finish within a minute.",
        epilog="example: memtui run --model llama-3.2-1b --device cpu --steps 3 --json",
    )
    add_training_flags(parser)
    group = parser.add_argument_group("live run")
    group.add_argument("--device", type=_choice("--device", ("auto", "cpu", "cuda")), default="auto",
                       help="cpu, cuda, or auto: cuda when NVML sees a GPU, else cpu (default auto)")
    group.add_argument("--steps", type=_positive_int("--steps"), help="training steps (default 3 on CPU, 10 on CUDA)")
    group.add_argument("--layers", type=_positive_int("--layers"), help="decoder layers of the scaled model (default: sized to fit)")
    group.add_argument("--width", type=_positive_int("--width"), help="hidden size of the scaled model, heads follow (default: sized to fit)")
    group.add_argument("--vocab", type=_positive_int("--vocab"), help="vocabulary of the scaled model (default: full on CUDA, 8192 on CPU)")
    group.add_argument("--max-fraction", type=_positive_float("--max-fraction"), default=0.25,
                       help="use at most this share of the free memory (default 0.25)")
    group.add_argument("--capacity", type=_capacity_bytes, metavar="GIB",
                       help="pretend the device holds only this many GiB (OOM demos)")
    group.add_argument("--force", action="store_true", help="run even if predicted not to fit (an OOM is reported as a result)")
    group.add_argument("--if-unsupported", type=_choice("--if-unsupported", ("refuse", "skip")), default="refuse",
                       help="an option this device cannot run (QLoRA, 8-bit Adam on CPU): refuse, or skip it (default refuse)")
    group.add_argument("--hz", type=_positive_float("--hz"), default=20.0, help="samples per second (default 20)")
    group.add_argument("--record-nvml", metavar="PATH", help="record the NVML readings to a JSON-lines file (CUDA)")
    group.add_argument("--json", action="store_true", help="stream JSON lines: sample, phase, ..., and a summary last")
    parser.set_defaults(handler=run)


def _capacity_bytes(text: str) -> int:
    """--capacity in GiB, as bytes: a finite size of at least one byte (inf or 1e-30 are refused here, by name)."""
    from memtui.engine.units import GiB

    gib = _positive_float("--capacity")(text)
    if not math.isfinite(gib) or gib * GiB < 1:
        raise argparse.ArgumentTypeError(
            f"--capacity: must be a finite size of at least one byte (1e-9 GiB), got {text}")
    return int(gib * GiB)


def options_from_args(args: argparse.Namespace):
    from memtui.engine.live.plan import LiveOptions

    return LiveOptions(
        device=args.device, steps=args.steps, layers=args.layers, width=args.width, vocab=args.vocab,
        seq_len=args.seq_len, batch_size=args.batch_size, max_fraction=args.max_fraction, force=args.force,
        if_unsupported=args.if_unsupported, capacity_bytes=args.capacity,
        hz=args.hz, record_nvml=args.record_nvml,
    )


def run(args: argparse.Namespace) -> int:
    from memtui.engine.live.process import LiveRefused, WorkerProcess, preflight

    config = config_from_args(args)
    print_file_notes(args)
    options = options_from_args(args)
    try:
        checked = preflight(config, options)
    except LiveRefused as refused:
        print(f"memtui: error: {refused}", file=sys.stderr)
        return 2
    worker = WorkerProcess(config, options, device_kind=checked.device_kind, ranks=checked.ranks)
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            worker.start()
        except LiveRefused as refused:
            print(f"memtui: error: {refused}", file=sys.stderr)
            return 2
        if args.json:
            return _stream_json(worker)
        return _show_progress(worker, checked.note)
    finally:
        worker.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt  # the finally above ends the worker; main() exits 130


def _final_code(message: dict[str, Any]) -> int:
    if message["type"] == "refused":
        print(f"memtui: error: {message['reason']}", file=sys.stderr)
        return 2
    if message["type"] == "error":
        print(f"memtui: error: live run failed: {message['text']}", file=sys.stderr)
        return 1
    return 0


def _stream_json(worker) -> int:
    from memtui.engine.live.protocol import encode

    for message in worker.messages():
        if message["type"] in ("refused", "error"):
            return _final_code(message)
        sys.stdout.write(encode(message) + "\n")
        sys.stdout.flush()
    return 0


def _show_progress(worker, note: str) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from memtui.engine.telemetry.series import SampleSeries
    from memtui.engine.units import format_gib

    err = Console(stderr=True)
    out = Console()
    if note:
        err.print(f"[yellow]note:[/] {note}")
    series = SampleSeries()
    final: dict[str, Any] | None = None
    steps = None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("starting", total=None, status="")
        for message in worker.messages():
            kind = message["type"]
            series.add(message)
            if kind == "plan" and steps is None:  # a CPU run sends it again with its runtime measured
                steps = message["steps"]
                model = message["scaled_model"]
                progress.update(task, total=steps, completed=0, description=f"{model['name']}")
                err.print(f"[dim]scaled run: {'; '.join(model['changes']) or 'full size'}[/]")
            elif kind == "notice":
                err.print(f"[yellow]{message['text']}[/]")
            elif kind == "step":
                progress.update(task, completed=message["step"])
            elif kind in ("sample", "phase"):
                allocated = series.latest("allocated")
                status = f"step {message.get('step', 0)} of {steps or '?'} · {message.get('phase', '')}"
                if allocated is not None:
                    status += f" · {format_gib(allocated)}"
                progress.update(task, status=status)
            elif kind in ("summary", "refused", "error"):
                final = message
    if final is None or final["type"] != "summary":
        return _final_code(final or {"type": "error", "text": "no result"})
    print_summary(final, series, out)
    return 0


def print_summary(summary: dict[str, Any], series, console) -> None:
    from rich.table import Table

    from memtui.engine.units import format_gib

    def gib(value: int | None) -> str:
        return "N/A" if value is None else format_gib(value).removesuffix(" GiB")

    def pct(value: float | None) -> str:
        return "N/A" if value is None else f"{value:+.1f}%"

    predicted, measured, device = summary["predicted"], summary["measured"], summary["device"]
    model = summary["scaled_model"]
    title = (f"{model['name']} · {model['config']['precision']} · batch {model['batch_size']} x {model['seq_len']} "
             f"on {device.get('name', device.get('kind'))}")
    table = Table(title=title, title_justify="left")
    table.add_column("Per device, at the peak")
    table.add_column("Predicted GiB", justify="right")
    table.add_column("Measured GiB", justify="right")
    table.add_column("Error", justify="right")
    table.add_row("Tensor peak (allocated)", gib(predicted["tensor_peak_bytes"]), gib(measured.get("tensor_peak_bytes")),
                  pct(summary["error_pct"]["tensor_peak"]))
    for name, value in (measured.get("components") or {}).items():
        expected = predicted["components"].get(name)
        tiny = max(value or 0, expected or 0) < 1 << 20  # a few KiB either way: a % would be noise
        table.add_row(f"  {name.replace('_', ' ')}", gib(expected), gib(value),
                      "" if tiny else pct(summary["error_pct"]["components"].get(name)))
    label = measured.get("label", "device")
    table.add_row(f"Device peak ({label})", gib(predicted["device_peak_bytes"]), gib(measured.get("device_peak_bytes")),
                  pct(summary["error_pct"]["device_peak"]))
    console.print(table)
    result = summary["result"]
    if result == "oom" and summary.get("oom"):
        oom = summary["oom"]
        console.print(f"[bold red]OOM at {format_gib(oom['at_bytes'])} after step {oom['after_step']}[/] ({oom['phase']})")
    elif result == "cancelled":
        console.print(f"[yellow]cancelled after step {summary['steps_completed']} of {summary['steps']}[/]")
    else:
        console.print(f"[green]completed[/] {summary['steps_completed']} steps in {summary['seconds']:.1f} s; "
                      f"{series.samples} samples; peak in step {measured.get('peak_step')}, {measured.get('peak_phase')}")
    full = summary.get("full_model")
    if full and full.get("calibrated_tensor_peak_bytes") is not None:
        console.print(
            f"full {full['id']} on {full['gpu']}: analytic tensor peak {format_gib(full['analytic_tensor_peak_bytes'])}, "
            f"calibrated by the measured per-layer cost {format_gib(full['calibrated_tensor_peak_bytes'])} "
            f"(per layer: predicted {format_gib(full['per_layer']['predicted_bytes'])}, "
            f"measured {format_gib(full['per_layer']['measured_bytes'])})"
        )
    for note in summary.get("notes", []):
        console.print(f"[dim]note: {note}[/]")
