"""benchmarks/accuracy.py's random draws: the issue-11 knobs appear, and the seed's earlier rows stay as drawn."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_accuracy():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_random_rows_draw_the_stacks_knobs_beside_the_seeds_rows():
    accuracy = _load_accuracy()
    rows = accuracy.random_rows(40, 0)
    assert len(rows) == 40
    drawn = {key for row in rows for key in row}
    assert {"lora_dropout", "lora_dtype", "kbit_prep", "activation_offload", "float8"} <= drawn
    assert any(row["optimizer"].startswith("paged-") for row in rows)
    # Without the second generator's knobs each row is the one the seed drew before they existed: the first row of
    # docs/accuracy-random.md as measured before them.
    extras = {"lora_dropout", "lora_dtype", "kbit_prep", "activation_offload", "float8"}
    first = {key: value for key, value in rows[0].items() if key not in extras}
    second = {key: value for key, value in rows[1].items() if key not in extras}
    assert (first["model"], first["precision"], first["optimizer"]) == ("mistral-7b", "16-true", "adamw")
    assert (second["model"], second["precision"], second["optimizer"]) == ("qwen2.5-0.5b", "bf16-true", "lion")
