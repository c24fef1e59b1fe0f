"""Write a configuration and its budget to disk: Markdown for people, JSON for programs.

The JSON is exactly what `memtui estimate --json` prints for the same
configuration, so a file exported from the app and a CLI run can be diffed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from memtui.engine.errors import InputError
from memtui.engine.planning.ladder import SavingsLadder
from memtui.engine.model.specs import COMPONENT_LABELS, COMPONENT_NAMES, Budget
from memtui.engine.units import format_count, format_gib, gib_number

EXPORT_DIR_ENV = "MEMTUI_EXPORT_DIR"
DEFAULT_EXPORT_DIR = "memtui-exports"

@dataclass(frozen=True)
class ExportPaths:
    markdown: Path
    json: Path


def export_dir() -> Path:
    """$MEMTUI_EXPORT_DIR, or ./memtui-exports under the current directory."""
    override = os.environ.get(EXPORT_DIR_ENV)
    if not override:
        return Path.cwd() / DEFAULT_EXPORT_DIR
    try:
        return Path(override).expanduser()
    except RuntimeError:  # ~nosuchuser
        raise InputError(EXPORT_DIR_ENV, f"cannot expand {override!r}: no such user") from None


def budget_json(budget: Budget) -> str:
    """The `memtui estimate --json` text for this budget (with its trailing newline, as print adds)."""
    return json.dumps(budget.model_dump(mode="json"), indent=2) + "\n"


def _slug(text: str) -> str:
    """A file-name-safe piece: model ids can be paths to a config.json."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.").lower()
    return slug[:48] or "model"


def budget_markdown(budget: Budget, *, ladder: SavingsLadder | None = None, title: str | None = None) -> str:
    """A self-contained Markdown report: verdict, configuration, components, timeline, ladder, notes."""
    config = budget.config
    heading = title or f"{budget.model.id} on {config['gpus']}x {budget.gpu.id}"
    lines = [f"# memtui budget: {heading}", ""]
    verdict = "**Fits**" if budget.fits else "**Does not fit**"
    side = "headroom" if budget.headroom_bytes >= 0 else "over by"
    lines += [
        f"{verdict} on {budget.gpu.id} ({format_gib(budget.gpu.memory_bytes)}): {side} "
        f"{format_gib(abs(budget.headroom_bytes))}.",
        "",
        f"- Device peak (what nvidia-smi shows): {format_gib(budget.device_peak_bytes)}",
        f"- Tensor peak (torch.cuda.max_memory_allocated): {format_gib(budget.tensor_peak_bytes)}, "
        f"during {budget.peak_phase}",
        f"- Parameters: {format_count(budget.model.params)} ({format_count(budget.model.trainable_params)} trainable)",
        f"- Model states per GPU: {format_gib(budget.model_states.total)} = "
        f"{budget.bytes_per_param:.2f} bytes per parameter",
        f"- Method: {budget.method}",
        "",
        "## Configuration",
        "",
        "| option | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | `{value}` |" for name, value in config.items()]
    lines += ["", "## Per GPU, at the peak", "", "| component | GiB | % of device peak |", "| --- | ---: | ---: |"]
    total = max(budget.device_peak_bytes, 1)
    components = budget.per_gpu.model_dump()
    for name in COMPONENT_NAMES:
        value = components[name]
        lines.append(f"| {COMPONENT_LABELS[name]} | {gib_number(value)} | {100 * value / total:.1f} |")
    lines.append(f"| **Device peak** | **{gib_number(budget.device_peak_bytes)}** | 100.0 |")
    lines += ["", "## Step timeline", "", "| phase | GiB |", "| --- | ---: |"]
    lines += [f"| {point.phase} | {gib_number(point.bytes)} |" for point in budget.timeline]
    if ladder is not None:
        lines += [
            "",
            "## Savings ladder",
            "",
            "From the unoptimized baseline, one optimization at a time (device peak per GPU).",
            "",
            "| step | removes GiB | device peak GiB | bytes/param | fits |",
            "| --- | ---: | ---: | ---: | :---: |",
        ]
        for step in ladder.steps:
            removed = "" if step.is_baseline else gib_number(step.removed_total)
            lines.append(
                f"| {step.label} | {removed} | {gib_number(step.budget.device_peak_bytes)} | "
                f"{step.budget.bytes_per_param:.2f} | {'yes' if step.budget.fits else 'no'} |"
            )
    if budget.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in budget.notes]
    return "\n".join(lines) + "\n"


def _free_stem(directory: Path, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`... so two exports in the same second never overwrite."""
    candidate, counter = stem, 2
    while (directory / f"{candidate}.md").exists() or (directory / f"{candidate}.json").exists():
        candidate, counter = f"{stem}-{counter}", counter + 1
    return candidate


def export_budget(
    budget: Budget,
    *,
    directory: Path | None = None,
    ladder: SavingsLadder | None = None,
    title: str | None = None,
    now: datetime | None = None,
) -> ExportPaths:
    """Write `<model>-<gpu>-<timestamp>.md` and `.json`; returns both paths.

    An unusable directory (a file, /proc, no permission) is an InputError naming MEMTUI_EXPORT_DIR.
    """
    directory = directory if directory is not None else export_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        stem = _free_stem(directory, f"memtui-{_slug(budget.model.id)}-{_slug(budget.gpu.id)}-{stamp}")
        markdown_path = directory / f"{stem}.md"
        json_path = directory / f"{stem}.json"
        markdown_path.write_text(budget_markdown(budget, ladder=ladder, title=title), encoding="utf-8")
        json_path.write_text(budget_json(budget), encoding="utf-8")
    except OSError as error:
        raise InputError(EXPORT_DIR_ENV, f"cannot write to {str(directory)!r}: {error.strerror or error}") from None
    return ExportPaths(markdown=markdown_path, json=json_path)


__all__ = ["ExportPaths", "budget_json", "budget_markdown", "export_budget", "export_dir"]
