"""The typed live summary and how the CLI prints it: a run that did not complete is partial, never compared."""

from __future__ import annotations

import io

from rich.console import Console

from memtui.cli.run import print_summary
from memtui.engine.live.protocol import Summary, cancelled_summary
from memtui.engine.telemetry.series import SampleSeries

PREDICTED = {"tensor_peak_bytes": 100 << 20, "device_peak_bytes": 900 << 20,
             "components": {"weights": 40 << 20, "optimizer_states": 40 << 20}}
MODEL = {"name": "tiny", "config": {"precision": "bf16-mixed"}, "batch_size": 1, "seq_len": 64}


def printed(message: dict) -> str:
    out = io.StringIO()
    print_summary(Summary.model_validate(message), SampleSeries(), Console(file=out, width=140))
    return out.getvalue()


def test_a_stopped_run_prints_partial_figures_and_no_error():
    text = printed({"type": "summary", "result": "cancelled", "steps": 3, "steps_completed": 0, "predicted": PREDICTED,
                    "measured": {"tensor_peak_bytes": 75 << 20, "device_peak_bytes": 700 << 20, "label": "CPU RSS"},
                    "error_pct": {"tensor_peak": 33.9}, "scaled_model": MODEL, "device": {"kind": "cpu"}})
    assert "Measured GiB (cancelled: partial)" in text and "partial" in text.split("Tensor peak")[1].splitlines()[0]
    assert "%" not in text and "cancelled after step 0 of 3" in text


def test_a_completed_run_prints_its_errors():
    text = printed({"type": "summary", "result": "completed", "steps": 3, "steps_completed": 3, "seconds": 1.5,
                    "predicted": PREDICTED, "scaled_model": MODEL, "device": {"kind": "cpu"},
                    "measured": {"tensor_peak_bytes": 96 << 20, "device_peak_bytes": 950 << 20, "label": "CPU RSS",
                                 "components": {"weights": 40 << 20, "optimizer_states": 40 << 20}},
                    "error_pct": {"tensor_peak": 4.17, "device_peak": -5.26, "components": {"weights": 0.0}}})
    assert "+4.2%" in text and "-5.3%" in text and "partial" not in text and "completed" in text


def test_the_summary_keeps_fields_it_does_not_name_and_round_trips():
    message = cancelled_summary(2, 5, stopped=True)
    assert message["type"] == "summary" and message["result"] == "cancelled" and message["stopped"] is True
    summary = Summary.model_validate(message)
    assert not summary.complete and summary.steps_completed == 2 and summary.message() == message
