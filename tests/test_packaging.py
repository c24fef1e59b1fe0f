"""memtui installs one import package, `memtui`, and a user's working directory cannot shadow it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the README's commands install it)")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(out), str(ROOT)], check=True, capture_output=True,
                   timeout=300)
    (built,) = out.glob("memtui-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package_with_its_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"memtui"}
    assert "memtui/engine/estimator/__init__.py" in names
    assert "memtui/tui/app.tcss" in names
    assert "memtui/presets/models/llama-3.1-8b.json" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "memtui = memtui.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


INSTALLED_PROBE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from memtui.engine.model import presets
from memtui.engine.estimator import estimate
from memtui.engine.model.specs import TrainingConfig
report = {"presets": str(presets.presets_dir()), "tensor_peak": estimate(TrainingConfig(model="gpt2", seq_len=1024)).tensor_peak_bytes}
for name in ("engine", "tui", "cli"):
    try:
        __import__(name)
        report[name] = "imported"
    except ModuleNotFoundError:
        report[name] = "missing"
print(json.dumps(report))
"""


def test_installed_wheel_imports_as_memtui_only(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what an installer puts in site-packages for a pure wheel
    # -I -S: no working directory, no site (so not this checkout's editable .pth); the dependencies from
    # this environment's site-packages, added as a plain path.
    out = subprocess.run([sys.executable, "-I", "-S", "-c", INSTALLED_PROBE, str(target), sysconfig.get_paths()["purelib"]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["presets"] == str(target / "memtui" / "presets")
    assert report["tensor_peak"] > 0
    assert (report["engine"], report["tui"], report["cli"]) == ("missing", "missing", "missing")


@pytest.fixture
def shadowing_folder(tmp_path) -> Path:
    """A training repository in the DETR/DeiT layout, plus a memtui.py: each would shadow a module on import."""
    (tmp_path / "engine.py").write_text('raise SystemExit("shadowed by ./engine.py")\n')
    (tmp_path / "tui").mkdir()
    (tmp_path / "tui" / "__init__.py").write_text('raise SystemExit("shadowed by ./tui")\n')
    (tmp_path / "memtui.py").write_text('raise SystemExit("shadowed by ./memtui.py")\n')
    return tmp_path


@pytest.mark.slow
def test_a_live_run_from_a_folder_with_engine_py_ends_with_a_summary(shadowing_folder):
    out = subprocess.run([str(BIN / "memtui"), "run", "--model", "qwen2.5-0.5b", "--device", "cpu", "--steps", "1",
                          "--json"], cwd=shadowing_folder, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["type"] == "summary"


def test_serves_app_command_starts_memtui_from_a_shadowing_folder(shadowing_folder):
    from memtui.cli.serve import app_command

    # textual-serve runs the command through the shell, as here.
    out = subprocess.run(["sh", "-c", app_command() + " --version"], cwd=shadowing_folder, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("memtui ")
