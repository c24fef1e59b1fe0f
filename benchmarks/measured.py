"""How close memtui is to GPU memory measured and published by the frameworks people train with.

    uv run python benchmarks/measured.py [--no-write] [--check] [--trace]

Reads benchmarks/measured_data.toml (each published figure with its source, the quote, the setup recovered
from the publisher's code of that date, what was measured and the memtui flags of the closest setup), runs
memtui's estimator on every row in-process and writes docs/measured.md: per row memtui's figure and the error,
and the summary (median and max |error| per metric kind) over the rows whose setup memtui can express.

Like is compared with like: a published max_memory_allocated (or torchtune's active peak) with memtui's tensor
peak, max_memory_reserved with the reserved peak of the estimator's step replayed through the allocator model
(the device peak less the CUDA context where it replays none), nvidia-smi with the device peak, "OOM"
and "runs on" with the device peak against the card, and "the longest sequence that fit in N GB" with
`fit --max-seq` on a card of N GiB. Rows whose setup needs an option memtui does not have yet are computed
with the closest flags and reported apart; rows that are physically impossible or not reproducible are listed
with the reason. No constant is fitted to any row. --check exits 1 when docs/measured.md is not what this
script writes (nothing is written then). Deterministic: the same data and estimator give the same file.

A multi-GPU reserved row also shows `memtui trace`'s reserved peak, the check of the estimator's own replay: the
traced rank's allocations replayed through the allocator, each stream's pools apart. Tracing takes seconds a row, so --trace runs the traces and keeps their figures, with the flags traced, in
benchmarks/measured_traces.json; the doc is written from that file (a figure whose flags no longer match its row
is left out until --trace runs again).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from memtui.cli.options import add_training_flags, config_from_args  # noqa: E402
from memtui.engine.estimator import estimate  # noqa: E402
from memtui.engine.estimator.overhead import cuda_context_bytes  # noqa: E402
from memtui.engine.estimator.reserved import with_reserved  # noqa: E402
from memtui.engine.model.presets import resolve_gpu, resolve_model  # noqa: E402
from memtui.engine.model.specs import TrainingConfig  # noqa: E402
from memtui.engine.model.validation import check_config  # noqa: E402
from memtui.engine.planning.fit.sequence import max_seq_len  # noqa: E402

DATA = ROOT / "benchmarks" / "measured_data.toml"
DOC = ROOT / "docs" / "measured.md"
TRACES = ROOT / "benchmarks" / "measured_traces.json"

UNITS = {"GB": 10**9, "GiB": 2**30, "MB": 2**20, "tokens": 1}
NUMERIC_KINDS = ("allocated", "reserved", "device", "max_seq")
VERDICT_KINDS = ("oom", "fits")
KINDS = NUMERIC_KINDS + VERDICT_KINDS
EXCLUSIONS = ("impossible", "not reproducible", "not expressible")
REQUIRED = ("id", "framework", "source", "quote", "setup", "measured", "kind")
KIND_TEXT = {
    "allocated": "peak allocated vs memtui's tensor peak",
    "reserved": ("peak reserved vs memtui's reserved peak, its step replayed through the allocator model (its device "
                 "peak less the CUDA context where it replays none)"),
    "device": "nvidia-smi vs memtui's device peak",
    "max_seq": "longest sequence that fit vs memtui's `fit --max-seq`",
    "oom": "out of memory: memtui's device peak above the card",
    "fits": "runs on the card: memtui's device peak within it",
}
ALL_KIND = "all figures"
KIND_TEXT[ALL_KIND] = "every numeric row of this table together (the estimator's figure, whatever its kind)"
TRACE_KIND = "reserved (trace)"
KIND_TEXT[TRACE_KIND] = ("peak reserved vs `memtui trace`'s allocator replay of the traced rank (the multi-GPU "
                         "rows: a check of the estimator's own replay)")


class FlagError(ValueError):
    """A row's flags that memtui's CLI refuses."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit; a bad row is a data error here
        raise FlagError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memtui estimate", add_help=False)
    add_training_flags(parser)
    return parser


def _argv(flags: str) -> list[str]:
    """The flags as argv; a --model path inside the checkout (benchmarks/measured_models) made absolute."""
    argv = shlex.split(flags)
    for index, word in enumerate(argv[:-1]):
        if word == "--model" and (ROOT / argv[index + 1]).is_file():
            argv[index + 1] = str(ROOT / argv[index + 1])
    return argv


def config_for(flags: str) -> TrainingConfig:
    """The TrainingConfig `memtui estimate FLAGS` would use (InputError or FlagError when refused)."""
    args = _parser().parse_args(_argv(flags))
    return config_from_args(args)


def load_rows(path: Path = DATA) -> list[dict]:
    with path.open("rb") as handle:
        return tomllib.load(handle)["row"]


def validate_row(row: dict) -> list[str]:
    """What is wrong with one row of the data file (empty when nothing)."""
    problems = [f"missing {key}" for key in REQUIRED if not row.get(key)]
    if not str(row.get("source", "")).startswith("https://"):
        problems.append("source is not an https URL")
    kind = row.get("kind")
    if kind not in KINDS:
        problems.append(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind in NUMERIC_KINDS:
        if not isinstance(row.get("value"), (int, float)) or row["value"] <= 0:
            problems.append("value must be a positive number")
        if row.get("unit") not in UNITS:
            problems.append(f"unit must be one of {', '.join(UNITS)}")
    if kind == "max_seq" and not row.get("capacity_gib"):
        problems.append("max_seq needs capacity_gib")
    excluded = row.get("excluded", "")
    if excluded and not excluded.startswith(EXCLUSIONS):
        problems.append(f"excluded must start with one of {', '.join(EXCLUSIONS)}")
    if not excluded and not row.get("flags"):
        problems.append("a row that is not excluded needs flags")
    if row.get("flags"):
        try:
            config = config_for(row["flags"])
            check_config(config, resolve_model(config.model), resolve_gpu(config.gpu))
        except (FlagError, ValueError) as error:  # InputError is a ValueError
            problems.append(f"flags: {error}")
    return problems


@dataclass(frozen=True)
class Result:
    row: dict
    status: str  # "expressible", "needs", or the exclusion ("impossible", ...)
    memtui: float | None  # in the row's unit; None for verdict rows and rows without flags
    error_pct: float | None
    verdict: str | None  # verdict rows: "agrees" or "disagrees"
    detail: str  # what memtui's figure is
    floor: float | None = None  # the weights, gradients and optimizer states alone, in the row's unit
    traced: float | None = None  # reserved rows: `memtui trace`'s allocator replay, in the row's unit
    traced_error_pct: float | None = None

    @property
    def below_floor(self) -> bool:
        """The published figure is less than the model states it must hold: physically impossible."""
        return self.floor is not None and self.row["value"] < self.floor


def _accepted(flags: str) -> bool:
    try:
        config = config_for(flags)
        check_config(config, resolve_model(config.model), resolve_gpu(config.gpu))
    except (FlagError, ValueError):
        return False
    return True


def adopt_available(row: dict) -> dict:
    """The row with every needed option that memtui now has (a need written as flags it accepts) moved to its flags.

    Needs are written as the flags they will take (`--lora-dropout 0.05`); once an option lands under that name,
    the row is computed with it and counts as expressible without editing the data. Descriptions stay needs.
    """
    if not row.get("flags") or not row.get("needs"):
        return row
    flags, needs, adopted = row["flags"], [], []
    for need in row["needs"]:
        if need.startswith("--") and _accepted(f"{flags} {need}"):
            flags, adopted = f"{flags} {need}", [*adopted, need]
        else:
            needs.append(need)
    return dict(row, flags=flags, needs=needs, adopted=adopted) if adopted else row


def _status(row: dict) -> str:
    excluded = row.get("excluded", "")
    if excluded:
        return next(kind for kind in EXCLUSIONS if excluded.startswith(kind))
    return "needs" if row.get("needs") else "expressible"


def evaluate(row: dict, traces: dict | None = None) -> Result:
    """`traces`: benchmarks/measured_traces.json's figures (read here when not given)."""
    status = _status(row)
    if not row.get("flags"):
        return Result(row, status, None, None, None, "")
    config = config_for(row["flags"])
    model = resolve_model(config.model)
    gpu = resolve_gpu(config.gpu)
    if row.get("capacity_gib"):
        gpu = gpu.model_copy(update={"memory_bytes": int(row["capacity_gib"] * 2**30)})
    kind = row["kind"]
    if kind == "max_seq":
        result = max_seq_len(config, model=model, gpu=gpu)
        memtui = float(result.seq_len)
        detail = f"max seq on {row['capacity_gib']} GiB"
    else:
        budget = estimate(config, model=model, gpu=gpu)
        if kind == "reserved":  # the estimator's step through the allocator model, where it replays one
            budget = with_reserved(budget, config, model, gpu)
        if kind in VERDICT_KINDS:
            over = budget.device_peak_bytes > gpu.memory_bytes
            agrees = over if kind == "oom" else not over
            detail = (f"device peak {budget.device_peak_bytes / 2**30:.2f} GiB of "
                      f"{gpu.memory_bytes / 2**30:.2f} GiB: {'over' if over else 'fits'}")
            return Result(row, status, None, None, "agrees" if agrees else "disagrees", detail)
        if kind == "allocated":
            peak, detail = budget.tensor_peak_bytes, "tensor peak"
        elif kind == "reserved" and budget.reserved_peak_bytes is not None:
            peak, detail = budget.reserved_peak_bytes, "reserved peak"
        elif kind == "reserved":
            peak, detail = budget.device_peak_bytes - cuda_context_bytes(gpu), "device peak less CUDA context"
        else:
            peak, detail = budget.device_peak_bytes, "device peak"
        memtui = peak / UNITS[row["unit"]]
        floor = budget.model_states.total / UNITS[row["unit"]]
        error = 100.0 * (memtui - row["value"]) / row["value"]
        traced = (_traced_reserved(row, _load_traces() if traces is None else traces)
                  if kind == "reserved" else None)
        traced_error = None if traced is None else 100.0 * (traced - row["value"]) / row["value"]
        return Result(row, status, memtui, error, None, detail, floor, traced, traced_error)
    error = 100.0 * (memtui - row["value"]) / row["value"]
    return Result(row, status, memtui, error, None, detail)


def _load_traces() -> dict:
    return json.loads(TRACES.read_text()) if TRACES.exists() else {}


def _traced_reserved(row: dict, traces: dict) -> float | None:
    """The row's reserved peak from `memtui trace`, in its unit, if traced with the row's flags."""
    traced = traces.get(row["id"])
    if traced is None or traced["flags"] != row["flags"]:
        return None
    return traced["reserved_peak_bytes"] / UNITS[row["unit"]]


def trace_rows(rows: list[dict]) -> dict:
    """Trace every expressible reserved row the estimator cannot replay and whose parallel program `memtui trace`
    runs."""
    from memtui.engine.trace import trace
    from memtui.engine.trace.parallel import traces_data_parallel

    traces = {}
    for row in rows:
        if row["kind"] != "reserved" or not row.get("flags") or _status(row) != "expressible":
            continue  # a row needing an option memtui lacks would be traced without it, as its estimate is
        config = config_for(row["flags"])
        if config.gpus == 1 or not traces_data_parallel(config):
            continue
        result = trace(config)
        traces[row["id"]] = {"flags": row["flags"], "reserved_peak_bytes": result.budget.reserved_peak_bytes,
                             "tensor_peak_bytes": result.budget.tensor_peak_bytes}
        print(f"traced {row['id']}: reserved {result.budget.reserved_peak_bytes / 2**30:.2f} GiB "
              f"({result.seconds:.0f} s)")
    return traces


def floor_mismatches(results: list[Result]) -> list[str]:
    """Rows marked impossible that memtui finds possible, and rows below their own model states not so marked."""
    return [r.row["id"] for r in results if r.below_floor != (r.status == "impossible")]


def needed_options(results: list[Result]) -> dict[str, list[str]]:
    """Each missing option and the rows that need it, the most needed first."""
    by_need: dict[str, list[str]] = {}
    for result in results:
        if result.status == "needs":
            for need in result.row["needs"]:
                by_need.setdefault(need, []).append(result.row["id"])
    return dict(sorted(by_need.items(), key=lambda item: (-len(item[1]), item[0])))


def summarize(results: list[Result], status: str) -> dict[str, dict]:
    """Per metric kind over the rows of one status: count, median and max |error| (numeric kinds), agreement."""
    summary: dict[str, dict] = {}
    for kind in KINDS:
        rows = [r for r in results if r.status == status and r.row["kind"] == kind]
        if not rows:
            continue
        if kind in VERDICT_KINDS:
            summary[kind] = {"n": len(rows), "agree": sum(r.verdict == "agrees" for r in rows)}
        else:
            errors = [abs(r.error_pct) for r in rows]
            summary[kind] = {"n": len(rows), "median": statistics.median(errors), "max": max(errors)}
    numeric = [abs(r.error_pct) for r in results if r.status == status and r.row["kind"] not in VERDICT_KINDS]
    if numeric:  # the target is over every figure of the setups memtui can express, whatever its kind
        summary[ALL_KIND] = {"n": len(numeric), "median": statistics.median(numeric), "max": max(numeric)}
    traced = [abs(r.traced_error_pct) for r in results if r.status == status and r.traced_error_pct is not None]
    if traced:
        summary[TRACE_KIND] = {"n": len(traced), "median": statistics.median(traced), "max": max(traced)}
    return summary


def summary_line(results: list[Result]) -> str:
    """One line, the figures the README quotes."""
    expressible = summarize(results, "expressible")
    parts = []
    for kind, stats in expressible.items():
        if "median" in stats:
            parts.append(f"{kind}: {stats['n']} row{'s' * (stats['n'] != 1)}, median |error| "
                         f"{stats['median']:.1f}%, max {stats['max']:.1f}%")
        else:
            parts.append(f"{kind}: {stats['agree']} of {stats['n']} verdicts agree")
    counts = {status: sum(r.status == status for r in results) for status in ("expressible", "needs", *EXCLUSIONS)}
    head = (f"{len(results)} published figures from {len({r.row['framework'] for r in results})} sources: "
            f"{counts['expressible']} expressible, {counts['needs']} need an option memtui lacks, "
            + ", ".join(f"{counts[k]} {k}" for k in EXCLUSIONS))
    return head + ("; expressible " + "; ".join(parts) if parts else "") + "."


def _figure(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if unit in ("tokens", "MB") else f"{value:.2f} {unit}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(results: list[Result]) -> list[str]:
    lines = ["| id | framework | measured | kind | memtui | error | flags |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        row = r.row
        published = _figure(row["value"], row["unit"]) if "value" in row else row["measured"]
        if r.verdict:
            ours, error = r.detail, r.verdict
        elif r.memtui is not None:
            ours, error = f"{_figure(r.memtui, row['unit'])} ({r.detail})", f"{r.error_pct:+.1f}%"
            if r.traced is not None:
                ours += f"; trace: {_figure(r.traced, row['unit'])} (allocator replay)"
                error += f"; trace {r.traced_error_pct:+.1f}%"
        else:
            ours, error = "-", "-"
        flags = f"`{row['flags']}`" if row.get("flags") else "-"
        lines.append(f"| {row['id']} | {_cell(row['framework'])} | {_cell(published)} | {row['kind']} | "
                     f"{_cell(ours)} | {error} | {_cell(flags)} |")
    return lines


def _floor_text(result: Result) -> str:
    if not result.below_floor:
        return ""
    return (f" (memtui: weights, gradients and optimizer states alone are "
            f"{_figure(result.floor, result.row['unit'])})")


def _summary_table(summary: dict[str, dict]) -> list[str]:
    lines = ["| kind | compared | rows | median \\|error\\| | max \\|error\\| |", "| --- | --- | --- | --- | --- |"]
    for kind, stats in summary.items():
        if "median" in stats:
            lines.append(f"| {kind} | {KIND_TEXT[kind]} | {stats['n']} | {stats['median']:.1f}% | "
                         f"{stats['max']:.1f}% |")
        else:
            lines.append(f"| {kind} | {KIND_TEXT[kind]} | {stats['n']} | {stats['agree']} of {stats['n']} agree | |")
    return lines


def render(results: list[Result]) -> str:
    by_id = {result.row["id"]: result.row for result in results}
    out = [
        "# Measured in the field",
        "",
        "Generated by `uv run python benchmarks/measured.py` from `benchmarks/measured_data.toml`; do not edit.",
        "",
        "Published GPU memory figures of fine-tuning runs (frameworks' READMEs and docs, a paper), each with the",
        "setup recovered from the publisher's code of that date, against memtui's estimator run with the flags",
        "shown. Like is compared with like: " + "; ".join(f"**{k}**: {v}" for k, v in KIND_TEXT.items()) + ".",
        "Error = (memtui - published) / published. No constant is fitted to any row or framework.",
        "To add a figure, add a `[[row]]` to the data file (its fields are described at its top) and rerun.",
        "",
        f"**Summary**: {summary_line(results)}",
        "",
        "## Expressible: memtui has every option the setup uses",
        "",
        *_summary_table(summarize(results, "expressible")),
        "",
        *_table([r for r in results if r.status == "expressible"]),
        "",
        "## Needs an option memtui does not have yet",
        "",
        "memtui's figure here is for the closest flags it has today (shown), not for the publisher's setup:",
        "these errors measure what the missing options are worth, not the estimator. Kept out of the summary.",
        "A need written as flags is adopted, and the row computed with it, once memtui accepts those flags.",
        "",
        *_summary_table(summarize(results, "needs")),
        "",
        *_table([r for r in results if r.status == "needs"]),
        "",
        "| id | needs |",
        "| --- | --- |",
        *[f"| {r.row['id']} | {_cell(', '.join(r.row['needs']))} |" for r in results if r.status == "needs"],
        "",
        "The rows that need each missing option, and those it alone would make expressible:",
        "",
        "| needs | rows | only this |",
        "| --- | --- | --- |",
        *[f"| {_cell(need)} | {len(ids)}: {', '.join(ids)} | "
          f"{', '.join(i for i in ids if len(by_id[i]['needs']) == 1) or '-'} |"
          for need, ids in needed_options(results).items()],
        "",
        "## Impossible, not reproducible or not expressible",
        "",
        "Listed with the reason, never dropped. Where flags exist memtui's figure is shown for reference.",
        "",
        *_table([r for r in results if r.status in EXCLUSIONS]),
        "",
        "| id | why |",
        "| --- | --- |",
        *[f"| {r.row['id']} | {_cell(r.row['excluded'])}{_floor_text(r)} |" for r in results if r.status in EXCLUSIONS],
        "",
        "## Sources and setups",
        "",
    ]
    for r in results:
        row = r.row
        out += [f"**{row['id']}** ({row['framework']}): <{row['source']}>", "",
                f"- published: {row['quote']}", f"- setup: {row['setup']}", f"- measured: {row['measured']}"]
        if row.get("notes"):
            out.append(f"- approximation: {row['notes']}")
        if row.get("adopted"):
            out.append(f"- options it needed that memtui now has: {', '.join(row['adopted'])}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def run() -> tuple[list[Result], str]:
    rows = [adopt_available(row) for row in load_rows()]
    traces = _load_traces()  # read once, not per row
    results = [evaluate(row, traces) for row in rows]
    return results, render(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the summary only")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/measured.md is out of date")
    parser.add_argument("--trace", action="store_true",
                        help=f"trace the reserved rows the estimator cannot replay into {TRACES.name} first (minutes)")
    args = parser.parse_args(argv)
    bad = {row.get("id", "?"): problems for row in load_rows() if (problems := validate_row(row))}
    if bad:
        for row_id, problems in bad.items():
            print(f"{DATA.name}: {row_id}: {'; '.join(problems)}", file=sys.stderr)
        return 2
    if args.trace:
        rows = [adopt_available(row) for row in load_rows()]
        TRACES.write_text(json.dumps(trace_rows(rows), indent=1, sort_keys=True) + "\n")
        print(f"wrote {TRACES.relative_to(ROOT)}")
    results, text = run()
    print(summary_line(results))
    for row_id in floor_mismatches(results):
        print(f"{DATA.name}: {row_id}: 'impossible' must mark exactly the figures below their model states",
              file=sys.stderr)
    if floor_mismatches(results):
        return 2
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC.relative_to(ROOT)} is out of date: run benchmarks/measured.py", file=sys.stderr)
            return 1
        return 0
    if not args.no_write:
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
