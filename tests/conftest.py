import os
import sys
import tempfile

# Where PYTHONDONTWRITEBYTECODE is set (this sandbox's image; some CI images) every subprocess the tests start
# (CLI runs, live-run workers, gloo ranks) compiled torch and transformers from source again: 14.8 against 6.2
# CPU-seconds to import both. The suite writes the installed packages' bytecode once instead.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Tests must never touch a GPU or the network, whatever machine they run on.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `uv run pytest` runs on two xdist workers (pyproject's addopts): each gets its own live-run lock folder, so
# two tests' CPU runs never refuse each other over the machine-wide lock (tests of the lock set their own).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("MEMTUI_LOCK_DIR", tempfile.mkdtemp(prefix=f"memtui-lock-{os.environ['PYTEST_XDIST_WORKER']}-"))
