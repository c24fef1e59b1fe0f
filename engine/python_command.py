"""How memtui starts Python subprocesses: this interpreter, with the working directory kept off sys.path.

`python -m X` puts the working directory first on sys.path, so a user's repository that holds an
`engine.py` or a `memtui/` folder (the DETR/DeiT layout) would shadow memtui's own modules in the
live worker, in each torchrun rank and in serve's per-browser app.
"""

from __future__ import annotations

import sys

# Python 3.10 has no -P: drop sys.path[0] ('' for -c) by hand, then run the module as -m would.
_RUN_MODULE_WITHOUT_CWD = (
    "import runpy, sys; del sys.path[0]; module = sys.argv.pop(1); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def python_module(module: str, *args: str) -> list[str]:
    """The argv of `python -m module args` that cannot import from the working directory."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", _RUN_MODULE_WITHOUT_CWD, module, *args]
