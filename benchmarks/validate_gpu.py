"""Validate the live prediction on real hardware: a matrix of `memtui run` configurations.

    uv run python benchmarks/validate_gpu.py                 # CUDA: every row, writes docs/validation.md
    uv run python benchmarks/validate_gpu.py --gpus 2        # + FSDP2/DDP rows across 2 local GPUs
    uv run python benchmarks/validate_gpu.py --device cpu    # the CPU rows (dispatch tracker + RSS)
    uv run python benchmarks/validate_gpu.py --only lora --dry-run

Each row is one `memtui run --json` (a scaled-down copy trained for real, a few
steps, in its own worker process), so the table measures exactly what users run.
Per row: predicted vs measured tensor peak (torch.cuda.max_memory_allocated on
CUDA, the dispatch tracker on CPU), reserved peak on CUDA (the allocator replay of
the run's steps, `--seq-lens` rows with padded lengths varying step to step,
against torch.cuda.max_memory_reserved) and device peak (NVML process memory on CUDA,
RSS on CPU), their error, the CUDA context measured before the first allocation,
the result (completed, or OOM) and the time. The script rewrites only its own
section of docs/validation.md (between `<!-- validate:DEVICE:begin -->` and
`<!-- validate:DEVICE:end -->`), so the CUDA and CPU tables live side by side.
Exit code: 0 when every row ran, 1 when a row failed, 2 for bad arguments or
no CUDA device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "validation.md"
TARGET_PCT = 10.0


@dataclass(frozen=True)
class Row:
    label: str
    flags: tuple[str, ...]
    cuda_only: bool = False
    min_gpus: int = 1
    extra: tuple[str, ...] = field(default_factory=tuple)


BASE = ("--model", "llama-3.2-1b")
MATRIX: tuple[Row, ...] = (
    Row("llama bf16-mixed AdamW (foreach)", BASE),
    Row("llama 16-mixed + GradScaler", (*BASE, "--precision", "16-mixed")),
    Row("llama 32-true", (*BASE, "--precision", "32-true")),
    Row("llama bf16-true", (*BASE, "--precision", "bf16-true")),
    Row("llama bf16-true + master weights", (*BASE, "--precision", "bf16-true", "--master-weights")),
    Row("llama AdamW fused", (*BASE, "--optimizer-impl", "fused")),
    Row("llama AdamW for-loop", (*BASE, "--optimizer-impl", "for-loop")),
    Row("llama SGD momentum", (*BASE, "--optimizer", "sgd-momentum")),
    Row("llama Adafactor", (*BASE, "--optimizer", "adafactor")),
    Row("llama Lion", (*BASE, "--optimizer", "lion")),
    Row("llama checkpointing full", (*BASE, "--checkpointing", "full")),
    Row("llama checkpointing selective", (*BASE, "--checkpointing", "selective")),
    Row("llama attention eager", (*BASE, "--attention", "eager")),
    Row("llama batch 4", (*BASE, "--batch-size", "4")),
    Row("llama LoRA r16 all-linear", (*BASE, "--lora-rank", "16", "--lora-targets", "all-linear")),
    Row("llama QLoRA nf4 r16", (*BASE, "--quant", "nf4", "--lora-rank", "16", "--lora-targets", "all-linear"),
        cuda_only=True),
    Row("llama int8 + LoRA r16", (*BASE, "--quant", "int8", "--lora-rank", "16"), cuda_only=True),
    Row("llama AdamW 8-bit", (*BASE, "--optimizer", "adamw-8bit"), cuda_only=True),
    Row("qwen2.5 bf16-mixed", ("--model", "qwen2.5-0.5b")),
    Row("mistral bf16-mixed", ("--model", "mistral-7b")),
    Row("phi-3 bf16-mixed", ("--model", "phi-3-mini")),
    Row("gpt2 bf16-mixed", ("--model", "gpt2")),
    Row("gemma-2 bf16-mixed", ("--model", "gemma-2-9b")),
    # Padded batches of varied length, step after step: the caching allocator's fragmentation, replayed.
    Row("llama padded 256-2048, 12 steps", (*BASE, "--seq-len", "2048", "--seq-lens", "uniform:256-2048",
                                             "--steps", "12"), cuda_only=True),
    Row("llama padded 512/4096/1024, 9 steps", (*BASE, "--seq-len", "4096", "--seq-lens", "512,4096,1024",
                                                 "--steps", "9"), cuda_only=True),
    Row("llama DDP", (*BASE, "--zero", "0"), min_gpus=2),
    Row("llama ZeRO-1", (*BASE, "--zero", "1"), min_gpus=2),
    Row("llama FSDP2 (ZeRO-3)", (*BASE, "--zero", "3"), min_gpus=2),
)


def gib(value: int | None) -> str:
    return "N/A" if value is None else f"{value / 2**30:.3f}"


def pct(value: float | None) -> str:
    return "N/A" if value is None else f"{value:+.1f}%"


def build_command(row: Row, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "memtui", "run", *row.flags, "--device", args.device, "--json"]
    if row.min_gpus > 1:
        command += ["--gpus", str(args.gpus)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    return command + list(args.extra)


def run_row(row: Row, args: argparse.Namespace) -> dict:
    command = build_command(row, args)
    began = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "error": f"timed out after {args.timeout} s", "seconds": args.timeout, "command": command}
    seconds = time.monotonic() - began
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = messages[-1] if messages and messages[-1]["type"] == "summary" else None
    if summary is None:
        error = (done.stderr.strip().splitlines() or ["no summary"])[-1]
        return {"row": row, "error": error, "seconds": seconds, "command": command}
    samples = sum(1 for m in messages if m["type"] == "sample")
    return {"row": row, "summary": summary, "samples": samples, "seconds": seconds, "command": command}


def table(results: list[dict], device: str) -> list[str]:
    lines = [
        "| configuration | scaled model (layers × hidden, batch × seq) | result | tensor peak pred / meas GiB | error "
        "| reserved peak pred / meas GiB | error | device peak pred / meas GiB | error | source | samples | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        row = result["row"]
        if "summary" not in result:
            lines.append(f"| {row.label} | | failed: {result['error'][:120]} | | | | | | | | | {result['seconds']:.0f} |")
            continue
        s = result["summary"]
        model, predicted, measured, error = s["scaled_model"], s["predicted"], s["measured"], s["error_pct"]
        outcome = s["result"]
        if outcome == "oom" and s.get("oom"):
            outcome = f"OOM at {gib(s['oom']['at_bytes'])} GiB after step {s['oom']['after_step']}"
        shape = f"{model['layers']} × {model['hidden_size']}, {model['batch_size']} × {model['seq_len']}"
        if model.get("seq_lens"):
            shape += f" (steps of {min(model['seq_lens'])}-{max(model['seq_lens'])})"
        if model.get("ranks", 1) > 1:
            shape += f", {model['ranks']} ranks"
        lines.append(
            f"| {row.label} | {shape} | {outcome} | {gib(predicted['tensor_peak_bytes'])} / "
            f"{gib(measured.get('tensor_peak_bytes'))} | {pct(error['tensor_peak'])} | "
            f"{gib(predicted.get('reserved_peak_bytes'))} / {gib(measured.get('reserved_peak_bytes'))} | "
            f"{pct(error.get('reserved_peak'))} | "
            f"{gib(predicted['device_peak_bytes'])} / {gib(measured.get('device_peak_bytes'))} | "
            f"{pct(error['device_peak'])} | {measured.get('device_peak_source', measured.get('label', ''))} | "
            f"{result['samples']} | {result['seconds']:.0f} |"
        )
    return lines


def section(results: list[dict], args: argparse.Namespace) -> str:
    device = next((r["summary"]["device"] for r in results if "summary" in r), {})
    within = [r for r in results if "summary" in r and r["summary"]["error_pct"]["tensor_peak"] is not None
              and abs(r["summary"]["error_pct"]["tensor_peak"]) <= TARGET_PCT]
    measured = [r for r in results if "summary" in r]
    context = device.get("context_bytes")
    header = [
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on **{device.get('name', args.device)}**"
        f" (driver {device.get('driver_version') or 'N/A'}, torch {device.get('torch') or _torch_version()}, "
        f"CUDA {device.get('cuda') or 'N/A'}, {platform.machine()}), memtui {_git_rev()}.",
        "",
        "Command: `" + " ".join(["uv run python benchmarks/validate_gpu.py", *sys.argv[1:]]) + "`",
        "",
        f"Tensor peak within ±{TARGET_PCT:.0f}%: **{len(within)} of {len(measured)}** rows"
        + (f"; CUDA context measured before the first allocation: {gib(context)} GiB." if context else "."),
        "",
    ]
    return "\n".join(header + table(results, args.device)) + "\n"


def write_section(path: Path, device: str, body: str) -> None:
    begin, end = f"<!-- validate:{device}:begin -->", f"<!-- validate:{device}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Validation\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n## {device.upper()}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=ROOT, check=True).stdout.strip()
        return f"{rev}-dirty" if changed else rev  # measured with uncommitted changes: say so
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "N/A"


def _cuda_available() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--gpus", type=int, default=1,
                        help="ranks for the DDP/ZeRO/FSDP2 rows (skipped below 2): local GPUs, or gloo processes on CPU")
    parser.add_argument("--steps", type=int, help="steps per run (default: memtui run's, 10 on CUDA, 3 on CPU)")
    parser.add_argument("--only", help="rows whose label contains this text")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per row (default 300)")
    parser.add_argument("--out", type=Path, default=DOC, help=f"the Markdown file (default {DOC.relative_to(ROOT)})")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("extra", nargs="*", help="after --: more `memtui run` flags for every row")
    args = parser.parse_args(argv)

    rows = [row for row in MATRIX if not (row.cuda_only and args.device == "cpu") and row.min_gpus <= args.gpus
            and (args.only is None or args.only.lower() in row.label.lower())]
    if not rows:
        print("validate_gpu: error: --only: no row matches", file=sys.stderr)
        return 2
    if args.dry_run:
        for row in rows:
            print("memtui " + " ".join(build_command(row, args)[3:]))
        return 0
    if args.device == "cuda" and not _cuda_available():
        print("validate_gpu: error: --device cuda: torch sees no CUDA device here (try --device cpu)", file=sys.stderr)
        return 2
    results = []
    for index, row in enumerate(rows, 1):
        print(f"[{index}/{len(rows)}] {row.label} …", end=" ", flush=True)
        result = run_row(row, args)
        results.append(result)
        if "summary" in result:
            s = result["summary"]
            print(f"{s['result']}, tensor peak {pct(s['error_pct']['tensor_peak'])}, "
                  f"device peak {pct(s['error_pct']['device_peak'])} ({result['seconds']:.0f} s)", flush=True)
        else:
            print(f"FAILED: {result['error']}", flush=True)
    write_section(args.out, args.device, section(results, args))
    print(f"wrote {args.out}")
    return 0 if all("summary" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
