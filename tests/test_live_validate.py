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
