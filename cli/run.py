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
    group.add_argument("--seq-lens", metavar="LENS",
                       help="each step's sequence length, to measure fragmentation from padded batches of varied "
                            "length: a list cycled (512,2048,1024) or uniform:MIN-MAX (seeded); scaled down with "
                            "the copy; on CUDA the reserved peak is predicted for exactly these steps")
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
        hz=args.hz, record_nvml=args.record_nvml, seq_lens=args.seq_lens,
    )


def run(args: argparse.Namespace) -> int:
    from memtui.engine.errors import InputError
    from memtui.engine.live.process import LiveRefused, WorkerProcess, preflight
    from memtui.engine.live.protocol import cancelled_summary

    interrupts = _Interrupts()
    worker = None
    try:
        try:
            config = config_from_args(args)
            print_file_notes(args)
            options = options_from_args(args)
            checked = preflight(config, options)
            worker = WorkerProcess(config, options, device_kind=checked.device_kind, ranks=checked.ranks)
            worker.start()
        except LiveRefused as refused:
            return _final_code({"type": "refused", "reason": str(refused)}, json_stream=args.json)
        except InputError as error:
            if args.json:  # the stream's terminal record; main() says it on stderr and exits 2
                _write_json({"type": "refused", "reason": str(error)})
            raise
        except KeyboardInterrupt:
            if args.json:
                _write_json(cancelled_summary(note="cancelled before the run started"))
            raise
        if args.json:
            return _stream_json(worker)
        return _show_progress(worker, checked.note)
    except BrokenPipeError:  # `memtui run ... | head -1`: the reader has all it wanted
        _discard_stdout()
        return 0
    finally:
        if worker is not None:
            worker.close()
        interrupts.restore()


class _Interrupts:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt once (main() exits 130); later ones wait their turn.

    Once is enough: the first starts the cancel, and a second Ctrl-C must not cut
    the stream before its cancelled summary.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received = False
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, _signum, _frame) -> None:
        if not self.received:
            self.received = True
            raise KeyboardInterrupt  # the finally in run() ends the worker

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush has nowhere to fail."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr)
    except OSError:  # SIGHUP: the terminal may be gone
        pass


def _write_json(message: dict[str, Any]) -> None:
    from memtui.engine.live.protocol import encode

    sys.stdout.write(encode(message) + "\n")
    sys.stdout.flush()


def _final_code(message: dict[str, Any], *, json_stream: bool = False) -> int:
    """Say how the run ended (the terminal record too, on a --json stream); the exit code."""
    if json_stream:
        _write_json(message)
    if message["type"] == "refused":
        _say(f"memtui: error: {message['reason']}")
        return 2
    if message["type"] == "error":
        _say(f"memtui: error: live run failed: {message['text']}")
        return 1
    return 0


def _stream_json(worker) -> int:
    from memtui.engine.live.protocol import is_final

    try:
        for message in worker.messages():
            if is_final(message):
                return _final_code(message, json_stream=True)
            _write_json(message)
        return 0
    except KeyboardInterrupt:
        _write_json(_cancelled_final(worker))
        _say("memtui: interrupted")
        return 130


def _cancelled_final(worker, grace: float = 3.0) -> dict[str, Any]:
    """Stop the worker and pass on its stream until its cancelled summary; one of our own if it cannot say."""
    import time

    from memtui.engine.live.protocol import cancelled_summary, is_final

    worker.interrupt()
    deadline = time.monotonic() + grace
    steps_completed, steps = 0, None
    for message in worker.messages(stop=lambda: time.monotonic() > deadline):
        if message["type"] == "summary":
            return message
        if is_final(message):
            break  # killed before it could say (still importing torch): the run was cancelled all the same
        if message["type"] == "step":
            steps_completed, steps = message["step"], message["steps"]
        _write_json(message)
    return cancelled_summary(steps_completed, steps, note="cancelled before the worker could report")


def _show_progress(worker, note: str) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from memtui.engine.live.protocol import Summary, is_final
    from memtui.engine.telemetry.series import SampleSeries
    from memtui.engine.units import format_gib

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:  # rich would exit 1; a reader that left is not an error
            self.quiet = True
            raise BrokenPipeError

    err = Console(stderr=True)
    out = StdoutConsole()
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
            elif is_final(message):
                final = message
    if final is None or final["type"] != "summary":
        return _final_code(final or {"type": "error", "text": "no result"})
    print_summary(Summary.model_validate(final), series, out)
    return 0


def print_summary(summary, series, console) -> None:
    """The table and the result of a `protocol.Summary`; a partial run's figures are marked, never compared."""
    from rich.table import Table

    from memtui.engine.units import format_gib

    def gib(value: int | None) -> str:
        return "N/A" if value is None else format_gib(value).removesuffix(" GiB")

    def pct(value: float | None) -> str:
        if not summary.complete:
            return "partial"  # a stopped run's peak so far is not the whole step's the prediction is for
        return "N/A" if value is None else f"{value:+.1f}%"

    predicted, measured, device, errors = summary.predicted, summary.measured, summary.device, summary.error_pct
    model = summary.scaled_model or {}
    title = (f"{model['name']} · {model['config']['precision']} · batch {model['batch_size']} x {model['seq_len']} "
             f"on {device.get('name', device.get('kind'))}")
    table = Table(title=title, title_justify="left")
    table.add_column("Per device, at the peak")
    table.add_column("Predicted GiB", justify="right")
    table.add_column("Measured GiB" if summary.complete else f"Measured GiB ({summary.result}: partial)", justify="right")
    table.add_column("Error", justify="right")
    table.add_row("Tensor peak (allocated)", gib(predicted.tensor_peak_bytes), gib(measured.tensor_peak_bytes),
                  pct(errors.tensor_peak))
    for name, value in (measured.components or {}).items():
        expected = predicted.components.get(name)
        tiny = max(value or 0, expected or 0) < 1 << 20  # a few KiB either way: a % would be noise
        table.add_row(f"  {name.replace('_', ' ')}", gib(expected), gib(value),
                      "" if tiny else pct(errors.components.get(name)))
    if predicted.reserved_peak_bytes is not None or measured.reserved_peak_bytes is not None:
        table.add_row("Reserved peak (caching allocator)", gib(predicted.reserved_peak_bytes),
                      gib(measured.reserved_peak_bytes), pct(errors.reserved_peak))
    table.add_row(f"Device peak ({measured.label})", gib(predicted.device_peak_bytes), gib(measured.device_peak_bytes),
                  pct(errors.device_peak))
    console.print(table)
    if summary.result == "oom" and summary.oom:
        oom = summary.oom
        console.print(f"[bold red]OOM at {format_gib(oom.at_bytes)} after step {oom.after_step}[/] ({oom.phase})")
    elif summary.result == "cancelled":
        console.print(f"[yellow]cancelled after step {summary.steps_completed} of {summary.steps}[/]")
    else:
        console.print(f"[green]completed[/] {summary.steps_completed} steps in {summary.seconds:.1f} s; "
                      f"{series.samples} samples; peak in step {measured.peak_step}, {measured.peak_phase}")
    full = summary.full_model
    if full and full.calibrated_tensor_peak_bytes is not None:
        console.print(
            f"full {full.id} on {full.gpu}: analytic tensor peak {format_gib(full.analytic_tensor_peak_bytes)}, "
            f"calibrated by the measured per-layer cost {format_gib(full.calibrated_tensor_peak_bytes)} "
            f"(per layer: predicted {format_gib(full.per_layer.predicted_bytes)}, "
            f"measured {format_gib(full.per_layer.measured_bytes)})"
        )
    for note in summary.notes:
        console.print(f"[dim]note: {note}[/]")
