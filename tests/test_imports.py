"""Import boundaries: the TUI starts without torch/transformers/NVML, and the engine never imports Textual."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pynvml")


def _modules_after(code: str) -> dict:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_tui_imports_no_torch_transformers_or_nvml():
    loaded = _modules_after("import memtui.tui.app")
    assert "textual" in loaded  # the probe really imported the app
    assert not [name for name in HEAVY if name in loaded]


def test_building_the_app_imports_nothing_heavy_either():
    # Constructing the app (not running it) is what `memtui` does before the first frame.
    loaded = _modules_after("from memtui.tui.app import MemtuiApp\nMemtuiApp()")
    assert not [name for name in HEAVY if name in loaded]


def test_the_light_engine_modules_do_not_load_textual():
    modules = [
        "memtui.engine.estimator", "memtui.engine.model.presets", "memtui.engine.model.validation", "memtui.engine.planning.ladder", "memtui.engine.planning.export",
        "memtui.engine.telemetry.local_gpu", "memtui.engine.units", "memtui.engine.model.specs", "memtui.cli", "memtui.cli.options",
        "memtui.cli.estimate", "memtui.cli.render", "memtui.cli.serve",
    ]
    loaded = _modules_after("\n".join(f"import {name}" for name in modules))
    assert "memtui.engine.planning.ladder" in loaded
    assert "textual" not in loaded
    assert not [name for name in HEAVY if name in loaded]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_engine_source_imports_textual_anywhere():
    """Covers function-level imports and the torch-heavy modules a subprocess would be slow to load."""
    offenders = []
    sources = sorted((ROOT / "engine").rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        for name in _imported_modules(path):
            if name == "textual" or name.startswith("textual."):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def _children_cpu_s() -> float:
    resource = pytest.importorskip("resource")  # POSIX only
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_tui_import_is_fast():
    """`memtui` opens well under a second on a laptop; a generous bound here still catches a torch import.
    CPU seconds, not wall-clock ones: a machine busy with other tests must not fail this."""
    start = _children_cpu_s()
    subprocess.run([sys.executable, "-c", "import memtui.tui.app"], cwd=ROOT, check=True, timeout=120)
    assert _children_cpu_s() - start < 2.5


FIRST_FRAME_PROBE = """
import json, os, sys, time

def since_exec() -> float:
    # Seconds since this process started (the kernel's start time, 10 ms ticks): interpreter start-up included.
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")

start = time.perf_counter()
from textual.app import App

report = {}

async def probe(pilot):
    from memtui.tui.widgets.budget import VerdictBanner

    report["first_frame_s"] = time.perf_counter() - start
    report["first_frame_since_exec_s"] = since_exec()
    report["first_frame_cpu_s"] = time.process_time()  # CPU since the interpreter started
    report["verdict"] = pilot.app.query_one(VerdictBanner).render().plain
    for _ in range(400):
        if pilot.app.query("#opt-model") and pilot.app.focused is not None:
            break
        await pilot.pause()
    report["inputs_s"] = time.perf_counter() - start
    report["inputs_cpu_s"] = time.process_time()
    report["heavy"] = [name for name in HEAVY if name in sys.modules]
    pilot.app.exit()

# What the installed `memtui` script runs (memtui.cli:entry calls main), headless and with a pilot instead of a terminal.
App.run = lambda app, _run=App.run, **kwargs: _run(app, headless=True, size=(120, 40), auto_pilot=probe)
os.environ["MEMTUI_NO_GPU_DETECT"] = "1"
from memtui.cli import main
main([])
print(json.dumps(report))
"""


def first_frame_report() -> dict:
    probe = f"HEAVY = {HEAVY!r}\n" + FIRST_FRAME_PROBE
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_planner_draws_its_first_frame_fast_and_stays_light():
    """`memtui` with no arguments: the budget is on screen well under a second on a laptop, and mounting every
    input imports nothing heavy either. The bounds are CPU seconds (a busy machine must not fail this), generous
    for slow CI machines without bytecode caches; importing torch alone would break them."""
    report = first_frame_report()
    assert "FIT" in report["verdict"]  # the first frame already shows the verdict
    assert report["heavy"] == []
    assert report["first_frame_cpu_s"] < 2.5
    assert report["inputs_cpu_s"] < 4.0


if __name__ == "__main__":
    # `uv run python tests/test_imports.py`: the start-up figure the README quotes (median and best of 15 runs).
    import statistics

    runs = [first_frame_report() for _ in range(15)]
    for key in ("first_frame_since_exec_s", "first_frame_cpu_s", "inputs_s"):
        print(f"{key}: median {statistics.median(run[key] for run in runs):.3f} "
              f"(min {min(run[key] for run in runs):.3f})")
