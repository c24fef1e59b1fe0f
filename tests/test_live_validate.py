"""benchmarks/validate_gpu.py: runnable without a GPU (dry run, clear refusal) and rewrites only its section."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "validate_gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("validate_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_memtui_run_commands():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--gpus", "2"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(load().MATRIX)
    assert all(line.startswith("memtui run ") and "--device cuda --json" in line for line in lines)
    assert any("--zero 3" in line and "--gpus 2" in line for line in lines)


def test_cpu_rows_leave_out_cuda_only_options():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--device", "cpu"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "--quant" not in done.stdout and "adamw-8bit" not in done.stdout
    assert "--zero" not in done.stdout  # multi-rank rows need --gpus 2


def test_writes_only_its_own_section(tmp_path):
    module = load()
    doc = tmp_path / "validation.md"
    doc.write_text("# V\n\n<!-- validate:cuda:begin -->\nold cuda\n<!-- validate:cuda:end -->\n\nkept\n")
    module.write_section(doc, "cuda", "new cuda\n")
    module.write_section(doc, "cpu", "cpu table\n")
    text = doc.read_text()
    assert "old cuda" not in text and "new cuda" in text and "kept" in text
    assert "## CPU" in text and "<!-- validate:cpu:begin -->\ncpu table\n<!-- validate:cpu:end -->" in text


def test_a_cuda_row_shows_reserved_predicted_and_measured_with_the_step_lengths():
    module = load()
    row = next(r for r in module.MATRIX if "--seq-lens" in r.flags)
    summary = {"scaled_model": {"layers": 4, "hidden_size": 2048, "batch_size": 1, "seq_len": 2048,
                                "seq_lens": [300, 2048, 900]},
               "predicted": {"tensor_peak_bytes": 2 << 30, "device_peak_bytes": 3 << 30, "reserved_peak_bytes": 5 << 29},
               "measured": {"tensor_peak_bytes": 2 << 30, "device_peak_bytes": 3 << 30, "reserved_peak_bytes": 1 << 31,
                            "device_peak_source": "NVML, this process"},
               "error_pct": {"tensor_peak": 0.0, "device_peak": 0.0, "reserved_peak": 25.0}, "result": "completed"}
    line = module.table([{"row": row, "summary": summary, "samples": 40, "seconds": 12.0}], "cuda")[-1]
    assert "(steps of 300-2048)" in line and "| 2.500 / 2.000 | +25.0% |" in line
