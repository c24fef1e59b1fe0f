"""The declared layers hold (import-linter), and no source imports memtui's folders by their bare names.

In the source tree `engine`, `tui` and `cli` are also importable on their own (the editable install
puts the checkout on sys.path), but an installed wheel has only `memtui`: a bare `import engine`
would work here and fail for every user.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("engine", "tui", "cli", "tests", "benchmarks")


def test_import_linter_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _bare_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in ("engine", "tui", "cli")]
    return found


def test_every_import_goes_through_the_memtui_package():
    # memtui/ itself: its own modules only; its subfolders are links to the folders above.
    sources = [*(ROOT / "memtui").glob("*.py"), *(path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py"))]
    assert len(sources) > 50
    offenders = [line for path in sources for line in _bare_imports(path)]
    assert offenders == []
