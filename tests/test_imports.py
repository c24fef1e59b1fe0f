"""Import boundaries: the TUI starts without torch/transformers/NVML, and the engine never imports Textual."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pynvml")


def _modules_after(code: str) -> dict:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_tui_imports_no_torch_transformers_or_nvml():
    loaded = _modules_after("import tui.app")
    assert "textual" in loaded  # the probe really imported the app
    assert not [name for name in HEAVY if name in loaded]


def test_building_the_app_imports_nothing_heavy_either():
    # Constructing the app (not running it) is what `memtui` does before the first frame.
    loaded = _modules_after("from tui.app import MemtuiApp\nMemtuiApp()")
    assert not [name for name in HEAVY if name in loaded]


def test_the_light_engine_modules_do_not_load_textual():
    modules = [
        "engine.estimator", "engine.presets", "engine.validation", "engine.ladder", "engine.export",
        "engine.local_gpu", "engine.units", "engine.specs", "engine.cli", "engine.cli.options",
        "engine.cli.estimate", "engine.cli.render", "engine.cli.serve",
    ]
    loaded = _modules_after("\n".join(f"import {name}" for name in modules))
    assert "engine.ladder" in loaded
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


def test_tui_import_is_fast():
    """`memtui` opens well under a second on a laptop; a generous bound here still catches a torch import."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tui.app"], cwd=ROOT, check=True, timeout=60)
    assert time.perf_counter() - start < 4.0
