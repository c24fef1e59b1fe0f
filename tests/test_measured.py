"""benchmarks/measured.py: the published measurements' data file is valid and docs/measured.md is what it writes."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_measured():
    spec = importlib.util.spec_from_file_location("measured_benchmark", ROOT / "benchmarks" / "measured.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


measured = _load_measured()
ROWS = measured.load_rows()


def test_the_data_file_has_enough_rows_from_enough_sources():
    assert len(ROWS) >= 25
    assert len({row["framework"] for row in ROWS}) >= 4
    assert len({row["id"] for row in ROWS}) == len(ROWS), "row ids must be unique"


@pytest.mark.parametrize("row", ROWS, ids=[row["id"] for row in ROWS])
def test_every_row_validates(row):
    # a source URL, a metric kind, a figure with its unit, and flags memtui's CLI parser and validator accept
    assert measured.validate_row(row) == []


def test_validation_catches_a_bad_row():
    row = dict(ROWS[0], source="litgpt README", kind="vibes", flags="--model llama-3.2-1b --lora-rank -1")
    problems = measured.validate_row(row)
    assert "source is not an https URL" in problems
    assert any(problem.startswith("kind 'vibes'") for problem in problems)
    assert any(problem.startswith("flags:") for problem in problems)
    assert measured.validate_row(dict(ROWS[0], excluded="because")) != []


def test_the_doc_is_what_the_script_writes():
    results, text = measured.run()
    assert (ROOT / "docs" / "measured.md").read_text() == text, "run `uv run python benchmarks/measured.py`"
    # the summary line quoted in the README comes from the same run
    readme = (ROOT / "README.md").read_text()
    assert measured.summary_line(results) in " ".join(readme.split())


def test_errors_are_computed_like_with_like():
    results, _ = measured.run()
    by_id = {result.row["id"]: result for result in results}
    packed = by_id["torchtune-3b-packed"]
    config = measured.config_for(packed.row["flags"])
    budget = measured.estimate(config)
    assert packed.memtui == pytest.approx(budget.tensor_peak_bytes / 2**30)  # allocated vs the tensor peak, in GiB
    assert packed.error_pct == pytest.approx(100 * (packed.memtui - 60.0) / 60.0)
    # every excluded row is listed with its reason, none dropped
    doc = (ROOT / "docs" / "measured.md").read_text()
    for row in ROWS:
        assert re.search(rf"^\| {re.escape(row['id'])} \|", doc, re.M), row["id"]
    assert all(result.status != "expressible" or not result.row.get("needs") for result in results)


def test_impossible_marks_exactly_the_figures_below_their_model_states():
    results, _ = measured.run()
    assert measured.floor_mismatches(results) == []
    impossible = [result for result in results if result.status == "impossible"]
    assert impossible and all(result.row["value"] < result.floor for result in impossible)


def test_a_needed_option_memtui_has_is_adopted_and_a_description_is_not():
    row = dict(ROWS[0], flags="--model llama-3.2-1b --batch-size 2",
               needs=["--grad-accum 4", "--no-such-option 3", "a bf16 loss"])
    adopted = measured.adopt_available(row)
    assert adopted["flags"] == "--model llama-3.2-1b --batch-size 2 --grad-accum 4"
    assert adopted["needs"] == ["--no-such-option 3", "a bf16 loss"]
    assert adopted["adopted"] == ["--grad-accum 4"]
    assert measured.config_for(adopted["flags"]).grad_accum == 4
    everything_there = measured.adopt_available(dict(row, needs=["--grad-accum 4"]))
    assert measured.evaluate(everything_there).status == "expressible"
