"""`memtui trace`: two real training steps on fake tensors, the exact tensor peak."""

from __future__ import annotations

import argparse
import json
import sys

from memtui.cli.options import add_training_flags, config_from_args, with_file_notes

HELP = "trace one training step of the real architecture on fake tensors (exact, no GPU)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "trace", help=HELP, description=HELP + ". Takes the same flags as `memtui estimate`.",
        epilog="example: memtui trace --model llama-3.1-8b --precision bf16-mixed --checkpointing full --json",
    )
    add_training_flags(parser)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object (estimate's schema + trace fields)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: fake tensors only (default); cuda: also run the two steps for real on the GPU and "
                             "report torch.cuda.max_memory_allocated beside the trace")
    parser.add_argument("--top", type=int, default=8, help="largest live tensors at the peak to list (default 8)")
    parser.add_argument("--alloc-conf", default=None, metavar="CONF",
                        help="PYTORCH_CUDA_ALLOC_CONF to replay the reserved peak with (default: torch's defaults), "
                             "e.g. expandable_segments:True")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from memtui.engine.model.presets import resolve_gpu, resolve_model
    from memtui.engine.model.validation import check_config

    from memtui.engine.allocator import parse_alloc_conf

    config = config_from_args(args)
    model = resolve_model(config.model)
    if model.family == "generic":  # a model_type not replayed by hand: transformers names its class and linears
        from memtui.engine.trace.generic import structured_spec

        model = structured_spec(model)
    # Validate before importing torch, so bad input fails in milliseconds.
    check_config(config, model, resolve_gpu(config.gpu))
    alloc_config = parse_alloc_conf(args.alloc_conf)

    from memtui.engine.trace import trace

    measured = None
    if args.device == "cuda":
        from memtui.engine.trace.cuda_check import cuda_available

        if not cuda_available():
            from memtui.engine.errors import InputError

            raise InputError("--device", "cuda was asked for but torch sees no CUDA device", "cpu, or cuda on a GPU machine")

    if args.json:
        result = trace(config, model=model, progress=_stderr_progress() if sys.stderr.isatty() else None,
                       alloc_config=alloc_config)
        result.budget = with_file_notes(result.budget, args)
        data = result.as_json()
        if args.device == "cuda":
            data["cuda"] = _measure(config)
        print(json.dumps(data, indent=2))
        return 0

    from rich.console import Console
    from rich.live import Live
    from rich.spinner import Spinner
    from rich.table import Table

    from memtui.cli.render import print_budget
    from memtui.engine.units import format_bytes

    console = Console()
    # The spinner is redrawn at each progress report rather than by Live's refresh thread: with no other thread
    # running, a pipeline trace makes its traces two at a time in a forked process (trace_pipeline).
    spinner = Spinner("dots", text="tracing…")
    with Live(spinner, console=console, auto_refresh=False, transient=True, redirect_stdout=False,
              redirect_stderr=False) as live:

        def progress(stage: str, _fraction: float) -> None:
            spinner.update(text=f"tracing: {stage}")
            live.refresh()

        result = trace(config, model=model, progress=progress, alloc_config=alloc_config)
    result.budget = with_file_notes(result.budget, args)
    if args.device == "cuda":
        with console.status("running the two steps on the GPU…"):
            measured = _measure(config)
    print_budget(result.budget, console)
    console.print(f"[dim]traced in {result.seconds:.1f} s; peak in step {result.peak_step}, {result.peak_phase}[/]")
    console.print("[bold]traced:[/] " + "; ".join(result.traced))
    console.print("[bold]modelled:[/] " + "; ".join(result.modelled))
    if result.allocator is not None:
        replayed = result.allocator
        console.print(f"[bold]caching allocator:[/] reserved peak {format_bytes(replayed['reserved_peak_bytes'])}, "
                      f"allocated peak {format_bytes(replayed['allocated_peak_bytes'])} (block sizes), "
                      f"{format_bytes(replayed['fragmentation_bytes'])} reserved beyond it")
        by_stream = replayed.get("reserved_by_stream")
        if by_stream:
            console.print("[bold]reserved by stream[/] (each stream's pools are its own): "
                          + ", ".join(f"{name} {format_bytes(size)}" for name, size in by_stream.items()))
    if measured is not None:
        traced = result.traced_tensor_peak_bytes
        real = measured["max_memory_allocated"]
        line = (f"[bold]{measured['device']}:[/] torch.cuda.max_memory_allocated {format_bytes(real)} vs traced "
                f"{format_bytes(traced)} ({100 * (traced - real) / max(real, 1):+.2f}%)")
        if measured.get("oom"):
            line += f"; out of memory: {measured['oom']}"
        console.print(line)
    if args.top > 0 and result.top_allocations:
        table = Table(title="Largest live tensors at the peak", title_justify="left")
        for column in ("size", "category", "made by", "shape", "dtype", "when"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for alloc in result.top_allocations[: args.top]:
            table.add_row(format_bytes(alloc["bytes"]), alloc["category"], alloc["op"], "x".join(map(str, alloc["shape"])),
                          alloc["dtype"], f"step {alloc['step']} {alloc['phase']}")
        console.print(table)
    return 0


def _measure(config) -> dict:
    from memtui.engine.model.presets import resolve_model
    from memtui.engine.trace.cuda_check import measure_on_cuda

    return measure_on_cuda(resolve_model(config.model), config)


def _stderr_progress():
    def report(stage: str, fraction: float) -> None:
        print(f"\r[{fraction:4.0%}] {stage:<30}", end="", file=sys.stderr, flush=True)
        if fraction >= 1.0:
            print(file=sys.stderr)

    return report
