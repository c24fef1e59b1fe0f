"""LivePanel: a live training run of the current configuration beside its prediction.

`start_run(config)` (bind to r) trains a scaled-down copy in a worker process;
`stop_run()` (bind to s) ends it within two seconds. While it runs the panel
shows measured memory over time with the predicted peak and the capacity as
lines and the phases marked, a predicted-vs-measured table, the step and the
elapsed time; then the result, OOM included ("OOM at X GiB after step i").
Everything the panel shows comes from the worker's messages through `ingest()`,
so a recorded stream replays through the same code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.worker import Worker, WorkerState, get_current_worker
from textual.widgets import DataTable, ProgressBar, Static

from memtui.engine.live.protocol import Summary, error_pct
from memtui.engine.telemetry.series import SampleSeries
from memtui.engine.units import GiB
from memtui.tui.live.chart import MemoryChart
from memtui.tui.live.controller import LiveRunController
from memtui.tui.live.messages import LiveRunEnded, LiveStreamUpdated

WORKER_GROUP = "memtui-live-run"
ROWS = (
    ("tensor", "Tensor peak"),
    ("weights", "  weights"),
    ("gradients", "  gradients"),
    ("optimizer_states", "  optimizer states"),
    ("activations", "  activations"),
    ("temporary", "  temporary"),
    ("device", "Device peak"),
)
STATES = ("idle", "starting", "running", "stopping", "done", "oom", "cancelled", "refused", "error")
# The stream comes at 20+ messages a second; the views are redrawn at most this often, so that a key
# pressed during a run is answered first (the data is never dropped, only the redraws are fewer).
REFRESH_INTERVAL_S = 0.1


def gib(n_bytes: int | None) -> str:
    return "N/A" if n_bytes is None else f"{n_bytes / GiB:,.3f} GiB"


def percent(value: float | None) -> str:
    if value is None:
        return "N/A"
    return f"{value + 0.0:+.1f}%"  # + 0.0: no "-0.0%"


class LivePanel(Vertical):
    DEFAULT_CSS = (Path(__file__).with_name("live.tcss")).read_text(encoding="utf-8")

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None,
                 lock: bool = True) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.controller = LiveRunController(self.post_message, lock=lock)
        self.options: Any = None  # memtui.engine.live.plan.LiveOptions for `r`; None: the defaults, unsupported options skipped
        self.state = "idle"
        self.series = SampleSeries()
        self.device: dict[str, Any] = {}
        self.plan: dict[str, Any] = {}
        self.summary: Summary | None = None
        self.notices: list[str] = []
        self.left_out: list[str] = []  # options this device cannot run, which the run goes on without
        self.step = 0
        self.steps = 0
        self.border_title = "Live run"
        self._last_refresh = 0.0
        self._refresh_timer: Any = None
        self._cells: dict[tuple[str, str], str] = {}  # what the table shows, so unchanged cells are not redrawn

    def compose(self) -> ComposeResult:
        yield Static("Press r to train a scaled-down copy of this configuration and measure it (R sets the "
                     "device, steps and size); s stops it, b shows the budget.",
                     id="live-status")
        yield Static("", id="live-left-out", markup=False)
        yield MemoryChart(id="live-chart")
        with Horizontal(id="live-progress-row"):
            yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="live-progress")
            yield Static("", id="live-progress-text")
        yield DataTable(id="live-table", cursor_type="none", zebra_stripes=True)
        yield Static("", id="live-result")

    def on_mount(self) -> None:
        table = self.query_one("#live-table", DataTable)
        table.add_column("Per device, at the peak", key="what")
        table.add_column("Predicted", key="predicted")
        table.add_column("Measured", key="measured")
        table.add_column("Error", key="error")
        for key, label in ROWS:
            table.add_row(label, "", "", "", key=key)
        self._show_left_out()
        self._set_state("idle")

    # ---- control ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    def start_run(self, config: Any, options: Any = None) -> bool:
        """Start a live run of `config` (a TrainingConfig); False if one is already running."""
        if self.running:
            self.notify("A live run is already going; press s to stop it.", severity="warning")
            return False
        from memtui.engine.live.plan import LiveOptions

        self.reset()
        self._set_state("starting")
        self._status("starting the worker (it imports torch: a few seconds)…")
        self._run_in_thread(config, options or self.options or LiveOptions(if_unsupported="skip"))
        return True

    def stop_run(self) -> bool:
        """Stop the run (returns at once; the worker is gone within two seconds)."""
        if not self.running:
            return False
        self._set_state("stopping")
        self._status("stopping…")
        self.controller.request_stop()
        return True

    @work(thread=True, exclusive=True, exit_on_error=False, group=WORKER_GROUP, name="live-run")
    def _run_in_thread(self, config: Any, options: Any) -> dict[str, Any]:
        worker = get_current_worker()
        return self.controller.run(config, options, cancelled=lambda: worker.is_cancelled)

    def on_unmount(self) -> None:
        self.controller.shutdown()

    # ---- messages from the thread -------------------------------------------------------------
    def on_live_stream_updated(self, event: LiveStreamUpdated) -> None:
        event.stop()
        for message in self.controller.take():
            self.ingest(message, refresh=False)
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        """Redraw now if the last redraw is REFRESH_INTERVAL_S old, else once that much time has passed."""
        wait = self._last_refresh + REFRESH_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.refresh_views()
        elif self._refresh_timer is None:
            self._refresh_timer = self.set_timer(wait, self._timed_refresh)

    def _timed_refresh(self) -> None:
        self._refresh_timer = None
        self.refresh_views()

    def on_live_run_ended(self, event: LiveRunEnded) -> None:
        event.stop()
        for message in self.controller.take():
            self.ingest(message, refresh=False)
        final = event.final
        if self.summary is None or final.get("type") != "summary" or final.get("stopped"):
            self.ingest(final, refresh=False)
        self.refresh_views()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != WORKER_GROUP:
            return
        event.stop()
        if event.state == WorkerState.ERROR:
            self.ingest({"type": "error", "text": f"{event.worker.error}"})

    # ---- the stream -> the view ---------------------------------------------------------------
    def reset(self) -> None:
        self.series = SampleSeries()
        self.device, self.plan, self.summary, self.notices, self.left_out = {}, {}, None, [], []
        self.step = self.steps = 0
        self.query_one("#live-result", Static).update("")
        self._show_left_out()
        self.refresh_views()

    def ingest(self, message: dict[str, Any], *, refresh: bool = True) -> None:
        """Apply one worker message to the panel's state (live, or replayed from a recording)."""
        kind = message.get("type")
        if kind in ("sample", "phase"):
            self.series.add(message)
            if self.state == "starting":
                self._set_state("running")
        elif kind == "hello":
            self._status(f"worker started (pid {message.get('pid')}); importing torch…")
        elif kind == "device":
            self.device = message
            self.border_title = f"Live run · {message.get('name', message.get('kind', ''))}"
        elif kind == "plan":
            self.plan = message
            self.steps = int(message.get("steps") or 0)
            model = message.get("scaled_model", {})
            changes = "; ".join(model.get("changes", [])) or "full size"
            self._status(f"{model.get('name', '')}: {changes}")
        elif kind == "notice":
            text = str(message.get("text", ""))
            if text in self.notices:  # the preflight said it before the worker did
                return
            self.notices.append(text)
            if message.get("level") == "warning":  # e.g. QLoRA on a CPU: said at the top, for the whole run
                self.left_out.append(text)
                self._show_left_out()
            elif self.is_attached:
                self.notify(text, title="Live run", markup=False, severity="information")
        elif kind == "step":
            self.step = int(message.get("step", 0))
            self.steps = int(message.get("steps") or self.steps)
        elif kind == "summary":
            if message.get("stopped") and self.summary is None:
                self._finish("cancelled", f"Stopped after step {self.step} of {self.steps or '?'}; the worker has ended.")
            elif not message.get("stopped"):
                self.summary = Summary.model_validate(message)
                self._show_summary(self.summary)
        elif kind == "refused":
            self._finish("refused", f"Refused: {message.get('reason', '')}")
        elif kind == "error":
            self._finish("error", f"Failed: {message.get('text', '')}")
        if refresh:
            self.refresh_views()

    def _show_summary(self, summary: Summary) -> None:
        measured = summary.measured
        if summary.result == "oom" and summary.oom:
            predicted = summary.predicted.tensor_peak_bytes if summary.predicted else None
            self._finish("oom", f"OOM at {gib(summary.oom.at_bytes)} after step {summary.oom.after_step} "
                                f"({summary.oom.phase}): predicted {gib(predicted)}")
            return
        if summary.result == "cancelled":
            self._finish("cancelled", f"Stopped after step {summary.steps_completed} of {summary.steps}; "
                                      "the figures are partial, so none is compared with the prediction.")
            return
        lines = [
            f"Completed {summary.steps_completed} steps in {summary.seconds:.1f} s: tensor peak "
            f"predicted {gib(summary.predicted.tensor_peak_bytes)}, measured {gib(measured.tensor_peak_bytes)} "
            f"({percent(summary.error_pct.tensor_peak)}); device peak ({measured.label}) "
            f"{gib(measured.device_peak_bytes)}."
        ]
        if measured.reserved_peak_bytes is not None and summary.predicted.reserved_peak_bytes is not None:
            lines.append(f"Reserved by the caching allocator: predicted {gib(summary.predicted.reserved_peak_bytes)}, "
                         f"measured {gib(measured.reserved_peak_bytes)} ({percent(summary.error_pct.reserved_peak)}).")
        full = summary.full_model
        if full and full.calibrated_tensor_peak_bytes is not None:
            lines.append(f"Full {full.id} on {full.gpu}: analytic {gib(full.analytic_tensor_peak_bytes)}, "
                         f"calibrated by the measured per-layer cost {gib(full.calibrated_tensor_peak_bytes)}.")
        self._finish("done", "\n".join(lines))

    def _show_left_out(self) -> None:
        banner = self.query_one("#live-left-out", Static)
        banner.update("Left out of this run (this device cannot run it): " + "; ".join(self.left_out)
                      if self.left_out else "")
        banner.display = bool(self.left_out)

    def _finish(self, state: str, text: str) -> None:
        self._set_state(state)
        model = self.plan.get("scaled_model") or {}
        self._status(f"{model.get('name', 'Live run')}: {state}; r runs it again, b shows the budget.")
        notices = "".join(f"\nnote: {notice}" for notice in self.notices)
        self.query_one("#live-result", Static).update(text + notices)

    def refresh_views(self) -> None:
        self._last_refresh = time.monotonic()
        self._refresh_chart()
        self._refresh_progress()
        self._refresh_table()

    def _device_field(self) -> str | None:
        if self.device.get("kind") != "cuda":
            return None
        return "nvml_process" if self.series.has("nvml_process") else "nvml_used"

    def _refresh_chart(self) -> None:
        predicted = (self.plan.get("predicted") or {}).get("tensor_peak_bytes")
        capacity = self.device.get("memory_bytes") if self.device.get("kind") == "cuda" else self.device.get("free_bytes")
        label = "allocated" if self.device.get("kind") != "cpu" else "tensors (CPU tracker)"
        self.query_one("#live-chart", MemoryChart).show(
            self.series, predicted_peak=predicted, capacity=capacity, device_field=self._device_field(),
            measured_label=label, placeholder="waiting for the first samples…" if self.running else "no run yet",
        )

    def _refresh_progress(self) -> None:
        bar = self.query_one("#live-progress", ProgressBar)
        if self.steps:
            bar.update(total=self.steps, progress=self.step)
        phase = self.series.phases[-1].phase if self.series.phases else ""
        text = f"step {self.step} of {self.steps or '?'} · {self.series.duration:.1f} s elapsed"
        if self.running and phase:
            text += f" · {phase}"
        # One row of fixed height: no layout pass for a text that changes ten times a second.
        self.query_one("#live-progress-text", Static).update(text if self.state != "idle" else "", layout=False)

    def _refresh_table(self) -> None:
        """Predicted beside measured; only a completed run's figures are compared (a partial peak is not a step's)."""
        table = self.query_one("#live-table", DataTable)
        predicted = self.plan.get("predicted") or {}
        components = predicted.get("components") or {}
        summary = self.summary
        measured = summary.measured if summary is not None else None
        complete = summary is not None and summary.complete
        partial = "" if complete else (" so far" if summary is None and self.running else " (partial)")
        device_label = measured.label if measured is not None else (
            "CPU RSS" if self.device.get("kind") == "cpu" else "NVML")
        device_field = self._device_field() or "rss"
        rows: dict[str, tuple[int | None, int | None]] = {
            "tensor": (predicted.get("tensor_peak_bytes"),
                       measured.tensor_peak_bytes if measured is not None else self.series.peak("allocated")),
            "device": (predicted.get("device_peak_bytes"),
                       measured.device_peak_bytes if measured is not None else self.series.peak(device_field)),
        }
        measured_components = (measured.components if measured is not None else None) or {}
        for key, _label in ROWS[1:-1]:
            rows[key] = (components.get(key), measured_components.get(key))
        for key, (expected, seen) in rows.items():
            self._set_cell(table, key, "predicted", gib(expected) if expected is not None else "")
            self._set_cell(table, key, "measured", gib(seen) + partial if seen is not None else "")
            if complete:
                shown = error_pct(expected, seen) if seen and seen >= 1 << 20 else None  # tiny parts: % is noise
                error = percent(shown) if shown is not None else ""
            else:
                error = "partial" if seen is not None and expected is not None else ""
            self._set_cell(table, key, "error", error)
        self._set_cell(table, "device", "what", f"Device peak ({device_label})")

    def _set_cell(self, table: DataTable, row: str, column: str, text: str) -> None:
        if self._cells.get((row, column)) != text:
            self._cells[(row, column)] = text
            table.update_cell(row, column, text, update_width=True)

    # ---- helpers -------------------------------------------------------------------------------
    def _status(self, text: str) -> None:
        self.query_one("#live-status", Static).update(text)

    def _set_state(self, state: str) -> None:
        self.state = state
        for name in STATES:
            self.set_class(name == state, f"-{name}")
        if self.is_attached:
            self.app.refresh_bindings()  # s is offered only while a run goes on
