"""`memtui replay SNAPSHOT`: a recorded CUDA memory snapshot through the allocator model, predicted vs recorded."""

from __future__ import annotations

import argparse
import json

HELP = "replay a recorded CUDA memory snapshot through the allocator model: predicted vs recorded reserved memory"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "replay", help=HELP, description=HELP + ". Record one on the GPU with "
        "torch.cuda.memory._record_memory_history() ... torch.cuda.memory._dump_snapshot('snap.pickle').",
        epilog="example: memtui replay snap.pickle --alloc-conf expandable_segments:True --json",
    )
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="the pickle written by torch.cuda.memory._dump_snapshot")
    parser.add_argument("--alloc-conf", default=None, metavar="CONF",
                        help="PYTORCH_CUDA_ALLOC_CONF to replay with (default: the one the snapshot recorded, "
                             "else torch's defaults)")
    parser.add_argument("--device-index", type=int, default=None, metavar="N",
                        help="which device's trace (default: the first that has one)")
    parser.add_argument("--device-total-gib", type=float, default=80.0, metavar="GIB",
                        help="the GPU's memory, for expandable segments' address range and "
                             "per_process_memory_fraction (default 80)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from memtui.engine.allocator import parse_alloc_conf
    from memtui.engine.allocator.snapshot import load_snapshot, replay_snapshot
    from memtui.engine.errors import InputError

    if args.device_total_gib <= 0:
        raise InputError("--device-total-gib", f"{args.device_total_gib} is not a size", "a number of GiB > 0")
    config = parse_alloc_conf(args.alloc_conf) if args.alloc_conf is not None else None
    snapshot = load_snapshot(args.snapshot)
    result = replay_snapshot(snapshot, config, device=args.device_index,
                             device_total=int(args.device_total_gib * 2**30))
    if args.json:
        print(json.dumps({"snapshot": args.snapshot, **result.as_json()}, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table

    from memtui.engine.units import format_bytes

    console = Console()
    data = result.as_json()
    table = Table(title=f"{args.snapshot}, device {result.device}: {result.allocations} allocations, "
                        f"{result.frees} frees replayed", title_justify="left")
    for column in ("", "predicted", "recorded", "error"):
        table.add_column(column, justify="left" if not column else "right")

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f}%"

    table.add_row("reserved peak (max_memory_reserved)", format_bytes(result.predicted_reserved_peak_bytes),
                  format_bytes(result.recorded_reserved_peak_bytes), pct(data["error_pct"]["reserved_peak"]))
    table.add_row("reserved at the snapshot", format_bytes(result.predicted_reserved_end_bytes),
                  format_bytes(result.recorded_reserved_end_bytes), pct(data["error_pct"]["reserved_end"]))
    table.add_row("segments at the snapshot", str(result.predicted_segments_end), str(result.recorded_segments_end), "")
    console.print(table)
    console.print(f"allocator settings: {result.alloc_conf or 'torch defaults'}")
    if not result.complete:
        console.print(f"[yellow]the trace starts mid-run ({format_bytes(result.recorded_start_bytes)} already "
                      "reserved, or frees of earlier allocations): the model starts empty, so only changes "
                      "compare. Record from the start, with a larger max_entries.[/]")
    divergence = result.first_divergence
    if divergence is None:
        console.print("the model's reserved memory matched the recording after every allocation and free")
    else:
        console.print(f"first divergence at trace event {divergence.event} ({divergence.action}): predicted "
                      f"{format_bytes(divergence.predicted_reserved_bytes)} reserved, recorded "
                      f"{format_bytes(divergence.recorded_reserved_bytes)}")
    return 0
