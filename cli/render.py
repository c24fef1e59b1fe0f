"""Readable terminal output for budgets (Rich), shared by estimate, trace and fit."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from memtui.engine.model.specs import COMPONENT_LABELS, COMPONENT_NAMES, Budget
from memtui.engine.units import format_count, format_gib, gib_number


def budget_table(budget: Budget, title: str | None = None) -> Table:
    config = budget.config
    heading = title or (
        f"{budget.model.id} on {config['gpus']}x {budget.gpu.id} · {config['precision']} · "
        f"batch {config['batch_size']} x {config['seq_len']} tokens"
    )
    table = Table(title=heading, title_justify="left", show_footer=True, expand=False)
    table.add_column("Per GPU, at the peak", footer="Device peak (NVML)")
    table.add_column("GiB", justify="right", footer=gib_number(budget.device_peak_bytes))
    table.add_column("%", justify="right", footer="100")
    total = max(budget.device_peak_bytes, 1)
    for name in COMPONENT_NAMES:
        value = getattr(budget.per_gpu, name)
        table.add_row(COMPONENT_LABELS[name], gib_number(value), f"{100 * value / total:.1f}")
    return table


def stage_table(budget: Budget) -> Table:
    """--pp: every pipeline rank's tensor peak and what it holds then (the budget above is the largest)."""
    table = Table(title="Pipeline ranks at their tensor peaks, GiB", title_justify="left", expand=False,
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False)
    short = {"weights": "wts", "gradients": "grads", "optimizer_states": "optim", "activations": "act",
             "temporary": "temp"}
    for heading in ("rank", "stage", "L", "has", "peak", "in", *short.values()):
        table.add_column(heading, justify="left" if heading in ("stage", "has", "in") else "right")
    for stage in budget.stages:
        table.add_row(str(stage.rank), ",".join(str(index) for index in stage.stages), str(stage.layers), stage.role,
                      gib_number(stage.tensor_peak_bytes), stage.peak_phase[:4],
                      *(gib_number(getattr(stage.per_gpu, name)) for name in short))
    return table


def _lengths(seq_lens: list[int]) -> str:
    return ",".join(str(length) for length in seq_lens) if len(seq_lens) <= 6 else f"{min(seq_lens)}-{max(seq_lens)}"


def print_budget(budget: Budget, console: Console | None = None) -> None:
    console = console or Console()
    console.print(budget_table(budget))
    verdict = "[bold green]fits[/]" if budget.fits else "[bold red]does not fit[/]"
    headroom = budget.headroom_bytes
    side = "headroom" if headroom >= 0 else "over by"
    console.print(
        f"{verdict} on {budget.gpu.id} ({format_gib(budget.gpu.memory_bytes)}): "
        f"{side} {format_gib(abs(headroom))}; tensor peak {format_gib(budget.tensor_peak_bytes)} "
        f"during {budget.peak_phase}"
        + (f"; reserved peak {format_gib(budget.reserved_peak_bytes)} (caching allocator replayed"
           + (f", fragmentation {format_gib(budget.fragmentation_bytes)}" if budget.fragmentation_bytes is not None else "")
           + (f", {len(budget.replayed_seq_lens)} steps of {_lengths(budget.replayed_seq_lens)} tokens"
              if budget.replayed_seq_lens and len(set(budget.replayed_seq_lens)) > 1 else "")
           + ")" if budget.reserved_peak_bytes is not None else "")
    )
    states = budget.model_states
    console.print(
        f"{format_count(budget.model.params)} params ({format_count(budget.model.trainable_params)} trainable); "
        f"model states {format_gib(states.total)} per GPU = {budget.bytes_per_param:.2f} bytes/param"
    )
    if budget.paged_bytes:
        console.print(
            f"paged optimizer states {format_gib(budget.paged_bytes)} in CUDA unified memory (not in the tensor "
            f"peak; in the device peak while resident)"
            + (f", {format_gib(budget.paged_evicted_bytes)} of it paged out to host memory"
               if budget.paged_evicted_bytes else ""))
    if budget.offloaded_activation_bytes:
        console.print(f"activations offloaded to CPU: {format_gib(budget.offloaded_activation_bytes)} of pinned host "
                      "memory at the end of the forward (not GPU memory)")
    if budget.stages:
        console.print(stage_table(budget))
    if budget.method not in ("estimate", "trace"):
        console.print(f"method: {budget.method}")
    for note in budget.notes:
        console.print(f"[dim]note: {note}[/]")
