"""memtui's planner: pick a model, a GPU and the optimizations, and watch one training step's memory.

Start-up stays fast: this module imports Textual and the (pure Python)
engine only; presets load on mount, NVML is asked in a worker thread after
the first frame, and torch is never imported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.lazy import Lazy
from textual.message import Message
from textual.widgets import ContentSwitcher, Footer, Header, OptionList
from textual.worker import Worker, WorkerState

from engine.errors import InputError
from engine.local_gpu import LocalGpu, detect_local_gpu
from tui.commands import PresetCommands
from tui.explain import EXPLAINERS, LADDER_INTRO, OVERVIEW
from tui.option_specs import OPTION_SPECS
from tui.planner import Planner, PlanResult
from tui.widgets.budget import ComponentTable, ErrorLine, PinSummary, SummaryLine, TimelineChart, VerdictBanner
from tui.widgets.ladder_view import LadderView, step_explainer_key
from tui.widgets.memory_bar import MemoryBar
from tui.widgets.options_panel import OptionsPanel
from tui.widgets.text import Text

DARK_THEME = "textual-dark"
LIGHT_THEME = "textual-light"

GpuDetector = Callable[[], "LocalGpu | None"]


@dataclass
class LocalGpuDetected(Message):
    """The NVML worker's answer: this machine's GPU, or None."""

    local_gpu: LocalGpu | None


def error_text(error: InputError) -> str:
    return error.message + (f" (allowed: {error.allowed})" if error.allowed else "")


class MemtuiApp(App[None]):
    """The planner screen: inputs on the left, the budget, its bar and the savings ladder on the right."""

    TITLE = "memtui"
    SUB_TITLE = "GPU memory planner"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {PresetCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("question_mark", "explain", "Explain",
                tooltip="What the focused option does, what it costs, when to use it"),
        Binding("f1", "explain", "Explain", show=False, priority=True,
                tooltip="What the focused option does, what it costs, when to use it"),
        Binding("p", "pin", "Pin/compare", tooltip="Pin this configuration; later changes show their delta against it"),
        Binding("e", "export", "Export", tooltip="Write the configuration and budget as Markdown and JSON"),
        Binding("t", "toggle_theme", "Light/dark", tooltip="Switch between the dark and the light theme"),
        Binding("q", "quit", "Quit", tooltip="Leave memtui"),
        # r and s are reserved for the live-run panel (tui/live).
    ]

    def __init__(self, *, gpu_detector: GpuDetector | None = detect_local_gpu,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.theme = DARK_THEME
        self.planner = Planner(options)
        self.gpu_detector = gpu_detector
        self.result: PlanResult | None = None
        self._gpu_chosen_by_user = False
        self.last_export = None  # engine.export.ExportPaths of the latest export

    # ---- layout ----------------------------------------------------------------
    def compose(self) -> ComposeResult:
        from engine import presets

        yield Header()
        with Horizontal(id="main"):
            # The inputs (many widgets) mount just after the first frame, so the budget shows at once.
            yield Lazy(OptionsPanel(self.planner, presets.models(), presets.gpus(), id="options"))
            with ContentSwitcher(id="right", initial="plan"):
                with Vertical(id="plan"):
                    with Vertical(id="glance"):
                        yield VerdictBanner(id="verdict")
                        yield ErrorLine(id="error-line")
                        yield MemoryBar(id="memory-bar")
                    with VerticalScroll(id="budget-scroll"):
                        yield SummaryLine(id="summary")
                        yield PinSummary(id="pin-summary")
                        with Horizontal(id="details"):
                            yield ComponentTable(id="components")
                            yield TimelineChart(id="timeline")
                        yield LadderView(id="ladder")
                        yield Text("", id="notes")
                # The live-run panel (tui/live) mounts here and calls show_panel("live-panel").
                yield Container(id="live-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_plan()
        if self.gpu_detector is not None:
            self.detect_gpu()

    @property
    def options_panel(self) -> OptionsPanel | None:
        """The inputs, or None in the moment before the lazy panel has mounted."""
        panels = self.query(OptionsPanel)
        return panels.first() if panels else None

    @on(OptionsPanel.Ready)
    def options_ready(self) -> None:
        self._show_field_errors()
        self.query_one("#opt-model").focus()

    def show_panel(self, panel_id: str) -> None:
        """Switch the right-hand side: "plan" (the budget) or "live-panel"."""
        self.query_one("#right", ContentSwitcher).current = panel_id

    # ---- the local GPU -----------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="gpu-detect")
    def detect_gpu(self) -> None:
        detector = self.gpu_detector
        if detector is not None:
            self.post_message(LocalGpuDetected(detector()))

    def on_local_gpu_detected(self, message: LocalGpuDetected) -> None:
        local = message.local_gpu
        if local is None:
            return
        select = not self._gpu_chosen_by_user
        self.planner.set_local_gpu(local, select=select)
        self._sync_inputs()
        self.refresh_plan()
        if select:
            self.notify(f"Planning for this machine's {local.nvml_name} "
                        f"({local.memory_total / 2**30:.2f} GiB as NVML reports it).", title="GPU found", markup=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            # Only the GPU probe runs in a worker; without it the planner simply keeps its preset GPU.
            self.log.warning(f"worker {event.worker.name} failed: {event.worker.error!r}")

    # ---- edits -----------------------------------------------------------------
    @on(OptionsPanel.Changed)
    def option_changed(self, event: OptionsPanel.Changed) -> None:
        planner, key, value = self.planner, event.key, event.value
        notes: list[str] = []
        if key == "model_path":
            notes = planner.set_model_path(str(value))
            if "model_path" not in planner.field_errors:
                notes.insert(0, f"Loaded {planner.options['model']}.")
                self._sync_inputs()
        elif OPTION_SPECS[key].kind == "int":
            planner.set_int_text(key, str(value))
        else:
            if key == "gpu":
                self._gpu_chosen_by_user = True
            notes = planner.set_option(key, value)
            if notes:
                self._sync_inputs()
        for note in notes:
            self.notify(note, markup=False)
        self.refresh_plan(changed_key=key)

    def apply_preset(self, kind: str, preset_id: str) -> None:
        """A palette choice: a model, a GPU or a recipe, applied over the current options."""
        from engine import presets

        planner = self.planner
        if kind == "model":
            notes = planner.set_option("model", preset_id)
            name = presets.models()[preset_id].name
        elif kind == "gpu":
            self._gpu_chosen_by_user = True
            notes = planner.set_option("gpu", preset_id)
            name = presets.gpus()[preset_id].name
        else:
            recipe = presets.recipes()[preset_id]
            if "gpu" in recipe.options:
                self._gpu_chosen_by_user = True
            notes = planner.apply_recipe(recipe)
            name = recipe.name
        self._sync_inputs()
        self.refresh_plan()
        self.notify(" ".join([f"Applied {name}.", *notes]), title={"model": "Model", "gpu": "GPU"}.get(kind, "Recipe"), markup=False)

    # ---- drawing -----------------------------------------------------------------
    def _sync_inputs(self) -> None:
        panel = self.options_panel
        if panel is not None:
            panel.sync()

    def _show_field_errors(self) -> None:
        """Each refused value's reason beside its field (the panel may not be mounted yet)."""
        panel, result = self.options_panel, self.result
        if panel is None or result is None:
            return
        errors = {key: error_text(error) for key, error in self.planner.field_errors.items()}
        if result.error is not None and result.error_field and result.error_field not in errors:
            errors[result.error_field] = error_text(result.error)
        panel.show_errors(errors)

    def refresh_plan(self, changed_key: str | None = None) -> None:
        """Recompute (microseconds) and redraw every read-out; `changed_key` is the option just edited."""
        planner = self.planner
        result = planner.compute()
        self.result = result
        self._show_field_errors()
        self.query_one(VerdictBanner).show(result)
        self.query_one(ErrorLine).show(result)
        self.query_one(SummaryLine).show(result)
        self.query_one(MemoryBar).budget = result.budget
        table = self.query_one(ComponentTable)
        table.result = result
        table.pinned = planner.pinned
        self.query_one(TimelineChart).budget = result.budget
        self.query_one(LadderView).show(result.ladder, changed_key=changed_key)
        self.query_one(PinSummary).show(result, planner.pinned)
        notes = self.query_one("#notes", Text)
        budget_notes = result.budget.notes if result.budget is not None else []
        notes.display = bool(budget_notes)
        notes.set(Content("\n").join(Content.assemble(("note: ", "bold"), note) for note in budget_notes))
        self.query_one("#plan").set_class(result.stale, "-stale")
        if result.budget is not None and result.model is not None and result.gpu is not None:
            self.sub_title = f"{result.model.name} on {result.config.gpus if result.config else 1}x {result.gpu.name}"

    # ---- actions -----------------------------------------------------------------
    @on(OptionList.OptionSelected, "#ladder-list")
    def explain_ladder_step(self) -> None:
        """Enter or a click on a ladder step (or ? while the ladder has focus): why that step helped."""
        from tui.screens.explain_screen import ExplainScreen

        step = self.query_one(LadderView).highlighted_step()
        if step is not None and not step.is_baseline:
            explainer = EXPLAINERS[step_explainer_key(step)]
            self.push_screen(ExplainScreen(explainer.markdown(), footer=f"Ladder step: {step.label}"))
        else:
            self.push_screen(ExplainScreen(LADDER_INTRO))

    def action_explain(self) -> None:
        from tui.screens.explain_screen import ExplainScreen  # Markdown is only needed once asked

        focused = self.focused
        if isinstance(focused, OptionList) and focused.id == "ladder-list":
            self.explain_ladder_step()
            return
        panel = self.options_panel
        row = panel.row_for(focused) if panel is not None else None
        if row is not None and row.spec.explainer in EXPLAINERS:
            self.push_screen(ExplainScreen(EXPLAINERS[row.spec.explainer].markdown()))
            return
        self.push_screen(ExplainScreen(OVERVIEW))

    def action_pin(self) -> None:
        pinned = self.planner.toggle_pin()
        self.refresh_plan()
        if pinned:
            self.notify("Pinned. Change options to see each component's delta; p again unpins.", title="Compare")
        elif self.planner.last_good is None:
            self.notify("Nothing to pin yet: fix the highlighted input first.", severity="warning")
        else:
            self.notify("Unpinned.", title="Compare")

    def action_export(self) -> None:
        from engine.export import export_budget

        result = self.result
        if result is None or result.budget is None or result.stale:
            self.notify("Fix the highlighted input first: exports are for a valid budget.", severity="warning",
                        title="Export")
            return
        title = None
        if result.model is not None and result.gpu is not None and result.config is not None:
            title = f"{result.model.name} on {result.config.gpus}x {result.gpu.name}"
        try:
            paths = export_budget(result.budget, ladder=result.ladder, title=title)
        except OSError as error:
            self.notify(f"Could not write the export: {error}", severity="error", title="Export", markup=False)
            return
        self.last_export = paths
        self.notify(f"{paths.markdown}\n{paths.json}", title="Exported", timeout=10, markup=False)

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT_THEME if self.current_theme.dark else DARK_THEME


def run_app() -> int:
    """`memtui` with no arguments."""
    app = MemtuiApp(gpu_detector=None if os.environ.get("MEMTUI_NO_GPU_DETECT") else detect_local_gpu)
    app.run()
    return app.return_code or 0
