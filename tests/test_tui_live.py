"""The live panel in the app: r starts a real CPU run of a tiny model, s stops it, nothing is left running."""

from __future__ import annotations

import time

import psutil
import pytest

from memtui.engine.live.plan import LiveOptions
from memtui.tui.app import MemtuiApp
from memtui.tui.live import LivePanel

pytestmark = pytest.mark.anyio  # async tests run on anyio's pytest plugin (asyncio backend)

TINY = LiveOptions(device="cpu", layers=1, width=128, vocab=1024, seq_len=64, steps=500)


@pytest.fixture(autouse=True)
def cpu_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUI_NO_NVML", "1")
    monkeypatch.setenv("MEMTUI_LOCK_DIR", str(tmp_path))


async def until(pilot, condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.1)


def children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


async def test_r_runs_live_and_s_stops_it_leaving_nothing_behind():
    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.result is not None and app.query("#opt-model"), 10)
        app.apply_preset("model", "llama-3.2-1b")
        panel = app.query_one(LivePanel)
        panel.options = TINY
        app.set_focus(None)  # keys go to the app, not to an input
        assert not app.query_one("#live-panel").display or app.query_one("#right").current == "plan"

        await pilot.press("r")
        assert app.query_one("#right").current == "live-panel" and panel.running
        await until(pilot, lambda: panel.step >= 1, 90)
        assert panel.series.samples >= 10 and panel.plan["scaled_model"]["layers"] == 1
        progress = str(app.query_one("#live-progress-text").render())
        assert progress.startswith("step ") and f"of {TINY.steps}" in progress and "elapsed" in progress
        assert app.query_one("#live-table").get_cell("tensor", "predicted").endswith("GiB")
        assert app.check_action("stop_run", ()) is True
        pid = panel.controller.worker_pid
        assert pid is not None and psutil.pid_exists(pid)

        began = time.monotonic()
        await pilot.press("s")
        await until(pilot, lambda: not panel.running, 5)
        assert time.monotonic() - began < 2.5
        assert panel.state == "cancelled" and "Stopped after step" in str(app.query_one("#live-result").render())
        assert not children()
        assert app.check_action("stop_run", ()) is False

        # A run still going when the app quits ends with it.
        await pilot.press("r")
        await until(pilot, lambda: panel.controller.worker_pid is not None, 10)
        await pilot.press("b")
        assert app.query_one("#right").current == "plan"
    assert not children()


async def test_panel_shows_an_oom_result_from_the_stream():
    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.query_one(LivePanel)
        app.show_panel("live-panel")
        predicted = {"tensor_peak_bytes": 3 << 30, "device_peak_bytes": 4 << 30,
                     "components": {"weights": 1 << 30, "gradients": 1 << 30}}
        stream = [
            {"type": "device", "kind": "cuda", "name": "NVIDIA L4", "memory_bytes": 24 << 30, "free_bytes": 23 << 30},
            {"type": "plan", "steps": 10, "scaled_model": {"name": "tiny", "changes": ["layers 32 -> 4"]},
             "predicted": predicted},
            *({"type": "sample", "t": 0.05 * i, "allocated": (i % 20) << 27, "reserved": None,
               "nvml_used": ((i % 20) << 27) + (1 << 29), "nvml_process": None, "rss": None} for i in range(60)),
            {"type": "phase", "t": 0.5, "step": 1, "phase": "forward", "allocated": 1 << 30},
            {"type": "summary", "result": "oom", "steps": 10, "steps_completed": 1, "predicted": predicted,
             "measured": {"tensor_peak_bytes": 5 << 30, "device_peak_bytes": None, "label": "NVML"},
             "error_pct": {"tensor_peak": -40.0, "device_peak": None},
             "oom": {"at_bytes": 5 << 30, "after_step": 1, "phase": "backward"}},
        ]
        for message in stream:
            panel.ingest(message)
        await pilot.pause()
        assert panel.state == "oom"
        assert "OOM at 5.000 GiB after step 1" in str(app.query_one("#live-result").render())
        assert panel.series.peak("nvml_used") == (19 << 27) + (1 << 29)


async def test_shift_r_sets_the_runs_device_steps_and_size_refusing_bad_values():
    from textual.widgets import Input, Select

    from memtui.tui.screens.live_settings import LiveSettingsScreen

    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.result is not None and app.query("#opt-model"), 10)
        app.apply_preset("model", "llama-3.2-1b")
        await pilot.pause()
        assert app.result.config.model == "llama-3.2-1b"  # no control's earlier change undoes the palette's pick
        app.set_focus(None)
        await pilot.press("R")
        assert isinstance(app.screen, LiveSettingsScreen)
        screen = app.screen
        screen.query_one("#live-device", Select).value = "cpu"
        screen.query_one("#live-steps", Input).value = "0"
        screen.query_one("#live-layers", Input).value = "1"
        screen.query_one("#live-width", Input).value = "256"
        screen.query_one("#live-steps", Input).focus()
        await pilot.press("enter")
        error = str(screen.query_one("#live-settings-error").render())
        assert app.screen is screen and "Steps: 0 is out of range (allowed: 1..1000, or empty)" in error

        screen.query_one("#live-steps", Input).value = "40"
        await pilot.press("enter")
        panel = app.query_one(LivePanel)
        assert not isinstance(app.screen, LiveSettingsScreen) and panel.running
        assert (panel.options.device, panel.options.steps, panel.options.layers, panel.options.width) == ("cpu", 40, 1, 256)
        await until(pilot, lambda: bool(panel.plan), 60)
        assert panel.plan["scaled_model"]["layers"] == 1 and panel.plan["scaled_model"]["hidden_size"] == 256
        await pilot.press("s")
        await until(pilot, lambda: not panel.running, 5)

        await pilot.press("R")  # the form remembers the last values; Escape leaves without running
        assert app.screen.query_one("#live-steps", Input).value == "40"
        await pilot.press("escape")
        assert not isinstance(app.screen, LiveSettingsScreen) and not panel.running
    assert not children()


async def test_partial_figures_are_labelled_partial_and_only_a_complete_run_is_compared():
    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.query_one(LivePanel)
        app.show_panel("live-panel")
        table = app.query_one("#live-table")
        predicted = {"tensor_peak_bytes": 100 << 20, "device_peak_bytes": 900 << 20,
                     "components": {"weights": 40 << 20, "optimizer_states": 40 << 20}}
        panel._set_state("starting")
        panel.ingest({"type": "device", "kind": "cpu", "name": "CPU", "memory_bytes": 8 << 30, "free_bytes": 6 << 30})
        panel.ingest({"type": "plan", "steps": 3, "scaled_model": {"name": "tiny", "changes": []}, "predicted": predicted})
        for i in range(20):  # mid-run: step 1's forward is no step's peak
            panel.ingest({"type": "sample", "t": 0.05 * i, "allocated": (30 + i) << 20, "rss": 700 << 20})
        await pilot.pause()
        assert table.get_cell("tensor", "measured") == "0.048 GiB so far"
        assert table.get_cell("tensor", "error") == "partial"
        assert table.get_cell("device", "error") == "partial"

        # Stopped at step 0: what the worker measured is partial, whatever error it sent.
        panel.ingest({"type": "summary", "result": "cancelled", "steps": 3, "steps_completed": 0,
                      "predicted": predicted, "measured": {"tensor_peak_bytes": 75 << 20, "device_peak_bytes": 700 << 20,
                                                           "label": "CPU RSS"},
                      "error_pct": {"tensor_peak": 33.9, "device_peak": None, "components": {}}})
        await pilot.pause()
        assert panel.state == "cancelled"
        assert table.get_cell("tensor", "measured") == "0.073 GiB (partial)"
        assert table.get_cell("tensor", "error") == "partial" and "+33.9%" not in str(table.get_row("tensor"))
        assert "partial" in str(app.query_one("#live-result").render())

        panel.reset()
        panel.ingest({"type": "plan", "steps": 3, "scaled_model": {"name": "tiny", "changes": []}, "predicted": predicted})
        panel.ingest({"type": "summary", "result": "completed", "steps": 3, "steps_completed": 3, "seconds": 2.0,
                      "predicted": predicted, "measured": {"tensor_peak_bytes": 96 << 20, "device_peak_bytes": 950 << 20,
                                                           "label": "CPU RSS",
                                                           "components": {"weights": 40 << 20, "optimizer_states": 40 << 20}},
                      "error_pct": {"tensor_peak": 4.17, "device_peak": -5.26, "components": {}}})
        await pilot.pause()
        assert table.get_cell("tensor", "measured") == "0.094 GiB"
        assert table.get_cell("tensor", "error") == "+4.2%" and table.get_cell("device", "error") == "-5.3%"


async def test_what_a_cpu_run_leaves_out_is_said_at_the_top_of_the_panel_at_once():
    from dataclasses import replace

    from memtui.engine.model.specs import TrainingConfig

    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.query_one(LivePanel)
        app.show_panel("live-panel")
        banner = app.query_one("#live-left-out")
        assert not banner.display
        config = TrainingConfig(model="llama-3.2-1b", optimizer="adamw-8bit")
        assert panel.start_run(config, replace(TINY, if_unsupported="skip"))
        await until(pilot, lambda: banner.display, 10)  # from the preflight, before the worker has loaded torch
        text = str(banner.render())
        assert text.startswith("Left out of this run") and "adamw-8bit needs CUDA" in text
        assert banner.region.y < app.query_one("#live-chart").region.y  # at the top, above the chart
        await until(pilot, lambda: bool(panel.plan), 60)
        assert panel.notices.count(panel.left_out[0]) == 1  # the worker's copy of it is not shown twice
        panel.stop_run()
        await until(pilot, lambda: not panel.running, 5)
    assert not children()


async def test_r_checks_each_value_as_typed_and_shows_what_the_copy_resolves_to_and_why():
    from textual.widgets import Input

    from memtui.tui.screens.live_settings import LiveSettingsScreen

    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.result is not None and app.query("#opt-model"), 10)
        assert app.result.config.model == "llama-3.1-8b"  # the first model: heads of 128, 4 per key/value head
        app.set_focus(None)
        await pilot.press("R")
        screen = app.screen
        assert isinstance(screen, LiveSettingsScreen)
        assert "whatever the model" in str(screen.query_one("#live-settings-scope").render())
        error = screen.query_one("#live-settings-error")
        resolved = screen.query_one("#live-settings-resolved")

        await pilot.press("0")  # Steps, focused first: refused as typed, before Enter
        await until(pilot, lambda: "Steps: 0 is out of range (allowed: 1..1000, or empty)" in str(error.render()), 10)
        assert screen.query_one("#live-steps", Input).has_class("-refused")
        await pilot.press("backspace", "x")  # a letter never lands in a number field
        await until(pilot, lambda: not error.has_class("-shown"), 10)
        assert screen.query_one("#live-steps", Input).value == ""
        assert not screen.query_one("#live-steps", Input).has_class("-refused")

        screen.query_one("#live-device").value = "cpu"
        screen.query_one("#live-width", Input).focus()
        await pilot.press("1", "0", "0")
        await until(pilot, lambda: "Width 100 -> 512" in str(resolved.render()), 10)
        text = str(resolved.render())
        assert "whole heads of 128" in text and "Layers" in text and "Steps 3: automatic" in text

        await pilot.press("backspace", "backspace", "backspace", "5", "0", "0", "0")  # wider than the model
        await until(pilot, lambda: "Would not start" in str(resolved.render()), 10)
        assert "Width: 5000 exceeds llama-3.1-8b's hidden size 4096" in str(resolved.render())
        await pilot.press("escape")
    assert not children()


async def test_a_cuda_runs_result_shows_the_reserved_peak_predicted_and_measured():
    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.query_one(LivePanel)
        app.show_panel("live-panel")
        predicted = {"tensor_peak_bytes": 1 << 30, "device_peak_bytes": 2 << 30, "reserved_peak_bytes": 3 << 29,
                     "components": {"weights": 1 << 29}}
        panel._set_state("starting")
        panel.ingest({"type": "plan", "steps": 10, "scaled_model": {"name": "tiny", "changes": []}, "predicted": predicted})
        panel.ingest({"type": "summary", "result": "completed", "steps": 10, "steps_completed": 10, "seconds": 4.0,
                      "predicted": predicted, "measured": {"tensor_peak_bytes": 1 << 30, "device_peak_bytes": 2 << 30,
                                                           "reserved_peak_bytes": 1 << 30, "label": "NVML"},
                      "error_pct": {"tensor_peak": 0.0, "device_peak": 0.0, "reserved_peak": 50.0, "components": {}}})
        await pilot.pause()
        result = str(app.query_one("#live-result").render())
        assert "Reserved by the caching allocator: predicted 1.500 GiB, measured 1.000 GiB (+50.0%)" in result
