"""memtui's planner: pick a model, a GPU and the optimizations, and watch one training step's memory.

Start-up stays fast: this module imports Textual and the (pure Python)
engine only; presets load on mount, NVML is asked in a worker thread after
the first frame, and torch is never imported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.lazy import Lazy
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import ContentSwitcher, Footer, Header, OptionList
from textual.worker import Worker, WorkerState, get_current_worker

from memtui.engine.errors import InputError
from memtui.engine.model.options import label
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.telemetry.local_gpu import LocalGpu, detect_local_gpu
from memtui.engine.units import format_gib
from memtui.tui.live import LivePanel
from memtui.tui.option_specs import OPTION_SPECS
from memtui.tui.planner import Planner, PlanResult
from memtui.tui.widgets.budget import (WIDE_FROM, BudgetScroll, ComponentTable, ErrorLine, FitHint, PinSummary,
                                SummaryLine, TimelineChart, VerdictBanner)
from memtui.tui.widgets.ladder_view import LadderView, step_explainer_key
from memtui.tui.widgets.memory_bar import MemoryBar
from memtui.tui.widgets.options_panel import OptionsPanel
from memtui.tui.widgets.stages import StageTable
from memtui.tui.widgets.text import Text

QUIT_KEYS = ("ctrl+c", "ctrl+q")  # work even before the inputs exist
FIT_SEARCH_DELAY = 0.2  # seconds without edits before the "to fit" search starts
ORPHAN_CHECK_INTERVAL = 1.0  # seconds between checks, when served, that `memtui serve` is still the parent
DARK_THEME = "textual-dark"
LIGHT_THEME = "textual-light"

GpuDetector = Callable[[], "LocalGpu | None"]


@dataclass
class LocalGpuDetected(Message):
    """The NVML worker's answer: this machine's GPU, or None."""

    local_gpu: LocalGpu | None


@dataclass
class LadderBuilt(Message):
    """The ladder worker's answer for `config` on `gpu` (None when building it failed)."""

    config: Any  # TrainingConfig
    gpu: Any  # GpuSpec
    ladder: Any  # memtui.engine.planning.ladder.SavingsLadder | None


@dataclass
class FitFound(Message):
    """The fit search's answer (memtui.engine.planning.fit.suggest) for `config`."""

    config: Any  # the TrainingConfig searched from
    suggestion: Any  # memtui.engine.planning.fit.Suggestion, or None when the search failed


@dataclass
class DerivationProgress(Message):
    """A stage of a generic model's derivation; only the latest one matters (a slow link drops the rest)."""

    model: str
    stage: str
    fraction: float

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DerivationProgress)


@dataclass
class DerivationDone(Message):
    """A generic model's step is derived for `config` (cached on disk), or why not."""

    config: Any  # TrainingConfig
    error: str | None


@dataclass
class HubConfigFetched(Message):
    """The Hub worker's answer for a typed `org/name`: its config.json is in the cache now, or why not."""

    hub_id: str
    error: InputError | None


def preset_commands_provider():
    """The palette's presets, loaded when the palette first opens (Textual accepts a callable here)."""
    from memtui.tui.commands import PresetCommands

    return PresetCommands


def hub_cache_commands_provider():
    """The palette's models from the Hugging Face cache, loaded when the palette first opens."""
    from memtui.tui.commands import HubCacheCommands

    return HubCacheCommands


def error_text(error: InputError) -> str:
    return error.reason(label)  # options named as the screen names them


class MemtuiApp(App[None]):
    """The planner screen: inputs on the left, the budget, its bar and the savings ladder on the right."""

    TITLE = "memtui"
    SUB_TITLE = "GPU memory planner"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {preset_commands_provider, hub_cache_commands_provider}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (WIDE_FROM, "-wide")]
    BINDINGS = [
        Binding("question_mark", "explain", "Explain",
                tooltip="What the focused option does, what it costs, when to use it"),
        Binding("f1", "explain", "Explain", show=False, priority=True,
                tooltip="What the focused option does, what it costs, when to use it"),
        Binding("f", "make_it_fit", "Make it fit", show=False,
                tooltip="Apply the least invasive change that fits, as the line under the verdict says"),
        Binding("p", "pin", "Compare", tooltip="Pin this configuration; later changes show their delta against it"),
        Binding("e", "export", "Export", tooltip="Write the configuration and budget as Markdown and JSON"),
        Binding("t", "toggle_theme", "Theme", tooltip="Switch between the dark and the light theme"),
        Binding("q", "quit", "Quit", tooltip="Leave memtui"),
        Binding("r", "live_run", "Live run",
                tooltip="Train a scaled-down copy of this configuration for real, measured beside its prediction"),
        Binding("R", "live_settings", "Live settings", show=False,
                tooltip="Set the live run's device, steps and the copy's size, then run it"),
        Binding("s", "stop_run", "Stop run", tooltip="Stop the live run; its worker process ends within two seconds"),
        Binding("b", "show_budget", "Budget", tooltip="Back to the budget (a live run goes on)"),
    ]

    def __init__(self, *, gpu_detector: GpuDetector | None = detect_local_gpu,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.theme = DARK_THEME
        self.planner = Planner(options)
        self.gpu_detector = gpu_detector
        self.result: PlanResult | None = None
        self._gpu_chosen_by_user = False
        self.last_export = None  # memtui.engine.planning.export.ExportPaths of the latest export
        self.live_settings = None  # memtui.tui.screens.live_settings.LiveSettings from R; None: automatic
        self.fit_suggestion: tuple[Any, Any] | None = None  # (config, memtui.engine.planning.fit.Suggestion) for the hint
        self._fit_timer: Timer | None = None
        self._ladder_changed_key: str | None = None  # the edit the ladder being built should highlight
        self._parent_pid = os.getppid()  # served: `memtui serve`; another parent later means it is gone
        self._ladder_building: tuple[Any, Any] | None = None  # (config, gpu) of the ladder worker's current job
        self._early_keys: list[events.Key] | None = []  # keys pressed before the inputs exist; None once they do
        self._deriving: TrainingConfig | None = None  # a generic model's options being traced in a subprocess
        self._derivation_process: Any = None  # its subprocess.Popen, killed with the app

    # ---- layout ----------------------------------------------------------------
    def compose(self) -> ComposeResult:
        from memtui.engine.model import presets

        yield Header()
        with Horizontal(id="main"):
            # The inputs (many widgets) mount just after the first frame, so the budget shows at once.
            panel = OptionsPanel(self.planner, presets.models(), presets.gpus(), id="options")
            if self.planner.options["model"] not in panel.models:  # opened on a config.json: the picker offers it
                panel.custom_models.append(self.planner.options["model"])
            yield Lazy(panel)
            with ContentSwitcher(id="right", initial="plan"):
                with Vertical(id="plan"):
                    with Vertical(id="glance"):
                        yield VerdictBanner(id="verdict")
                        yield ErrorLine(id="error-line")
                        yield FitHint(id="fit-hint")
                        yield MemoryBar(id="memory-bar")
                    with BudgetScroll(id="budget-scroll"):
                        yield SummaryLine(id="summary")
                        yield PinSummary(id="pin-summary")
                        with Horizontal(id="details"):
                            yield ComponentTable(id="components")
                            yield TimelineChart(id="timeline")
                        yield StageTable(id="stages")  # --pp only
                        yield LadderView(id="ladder")
                        yield Text("", id="notes")
                yield LivePanel(id="live-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_plan()
        # Threads started now would take the interpreter from the first frame: they start once it is drawn.
        if self.gpu_detector is not None:
            self.call_after_refresh(self.detect_gpu)
        self.call_after_refresh(gc.enable)  # off while starting (cli.open_planner): imports make no cycles
        if not self.is_headless:
            self._end_with_the_session()

    def on_unmount(self) -> None:
        self._stop_derivation()  # a quit mid-trace leaves no process behind

    def _end_with_the_session(self) -> None:
        """SIGTERM and SIGHUP end the app cleanly (terminal restored, a live run stopped); served to a
        browser, so does the server going away: the app was reparented, nobody reads its screen any more."""
        loop = asyncio.get_running_loop()
        for name in ("SIGTERM", "SIGHUP"):
            signum = getattr(signal, name, None)
            if signum is not None:
                with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
                    loop.add_signal_handler(signum, partial(self.exit, None, 128 + signum))
        if self.is_web:
            self.set_interval(ORPHAN_CHECK_INTERVAL, self._exit_if_orphaned)

    def _exit_if_orphaned(self) -> None:
        if os.getppid() != self._parent_pid:
            self.exit(return_code=128 + signal.SIGHUP)

    async def on_event(self, event: events.Event) -> None:
        """Keys typed while the planner starts wait for the inputs (replayed by options_ready), not lost."""
        if isinstance(event, events.Key) and self._early_keys is not None and event.key not in QUIT_KEYS:
            self._early_keys.append(event)
            return
        await super().on_event(event)

    @property
    def options_panel(self) -> OptionsPanel | None:
        """The inputs, or None in the moment before the lazy panel has mounted."""
        panels = self.query(OptionsPanel)
        return panels.first() if panels else None

    @on(OptionsPanel.Ready)
    def options_ready(self) -> None:
        if not self.query("#opt-model"):
            return  # the app is shutting down
        early_keys, self._early_keys = self._early_keys or [], None
        self._sync_inputs()  # what changed while they mounted (a palette pick, the local GPU)
        self._show_field_errors()
        self.query_one("#opt-model").focus()
        for key in early_keys:
            self.post_message(events.Key(key.key, key.character))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette: Textual's own commands (its theme picker replaced by `t`'s switch) and the app's actions."""
        from memtui.tui.commands import REPLACED_SYSTEM_COMMANDS, action_commands

        for command in super().get_system_commands(screen):
            if command.title not in REPLACED_SYSTEM_COMMANDS:
                yield command
        yield from action_commands(self)

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
        if local is None or not self.query(VerdictBanner):  # nothing found, or the app is shutting down
            return
        select = not self._gpu_chosen_by_user
        self.planner.set_local_gpu(local, select=select)
        self._sync_inputs()
        self.refresh_plan()
        if select:
            count = f" ({local.device_count} GPUs here; set the GPU count to plan for all)" if local.device_count > 1 else ""
            self.notify(f"Planning for this machine's {local.nvml_name}, "
                        f"{format_gib(local.memory_total)} as NVML reports it{count}.", title="GPU found",
                        markup=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            # The GPU probe: without it the planner simply keeps its preset GPU.
            self.log.warning(f"worker {event.worker.name} failed: {event.worker.error!r}")

    # ---- edits -----------------------------------------------------------------
    @on(OptionsPanel.Changed)
    def option_changed(self, event: OptionsPanel.Changed) -> None:
        planner, key, value = self.planner, event.key, event.value
        notes: list[str] = []
        if key == "model_path":
            self.load_model(str(value))
            return
        if OPTION_SPECS[key].kind in ("int", "float"):
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

    def load_model(self, text: str) -> None:
        """A typed config.json path or Hub id (the model field, the palette). A Hub id resolves in a worker: it
        may download its config.json."""
        from memtui.engine.model import presets
        from memtui.engine.model.hub import names_hub_repo

        text = text.strip()
        if names_hub_repo(text, presets.models()):
            self.fetch_hub_config(text)
        else:
            self.workers.cancel_group(self, "hub-config")  # a Hub id still downloading must not replace this
            self._apply_model_path(text)

    def _apply_model_path(self, text: str) -> None:
        notes = self.planner.set_model_path(text)
        if "model_path" not in self.planner.field_errors:
            notes.insert(0, f"Loaded {self.planner.options['model']}.")
            self._sync_inputs()
        for note in notes:
            self.notify(note, markup=False)
        self.refresh_plan(changed_key="model_path")

    @work(thread=True, exclusive=True, exit_on_error=False, group="hub-config")
    def fetch_hub_config(self, hub_id: str) -> None:
        from memtui.engine.model.hub import cached_config_path, hub_config_path, hub_offline

        error: InputError | None = None
        if cached_config_path(hub_id) is None and not hub_offline():
            self.call_from_thread(self.notify, f"Downloading config.json of {hub_id} from the Hugging Face Hub…",
                                  markup=False)
        try:
            hub_config_path(hub_id)  # into the Hugging Face cache, where the planner then reads it
        except InputError as refused:
            error = refused
        if not get_current_worker().is_cancelled:  # a later entry replaced this one
            self.post_message(HubConfigFetched(hub_id, error))

    @work(thread=True, exclusive=True, exit_on_error=False, group="derive")
    def derive_generic(self, config: TrainingConfig) -> None:
        """Trace a generic model's layers for `config` in a subprocess (the planner has no torch), reporting each
        stage; the program lands in the cache, where the next estimate reads it."""
        import json
        import subprocess

        from memtui.engine.python_command import python_module

        worker = get_current_worker()
        process = subprocess.Popen(python_module("memtui.engine.trace.generic", config.model_dump_json()),
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                   text=True)
        self._derivation_process = process
        error: str | None = None
        try:
            for line in process.stdout:
                if worker.is_cancelled:
                    break
                try:
                    said = json.loads(line)
                except ValueError:
                    continue
                if "stage" in said:
                    self.post_message(DerivationProgress(config.model, str(said["stage"]), float(said["fraction"])))
                elif "error" in said:
                    error = str(said["error"])
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        if worker.is_cancelled:
            return
        if error is None and process.returncode != 0:
            error = f"tracing {config.model}'s layers failed (exit code {process.returncode})"
        self.post_message(DerivationDone(config, error))

    def on_derivation_progress(self, message: DerivationProgress) -> None:
        if self.result is not None and self.result.to_derive is not None:
            self.query_one(ErrorLine).show_derivation(message.model, message.stage, message.fraction)

    def on_derivation_done(self, message: DerivationDone) -> None:
        self._deriving = None
        if message.error is not None:
            self.notify(message.error, severity="error", markup=False)
            return
        self.refresh_plan()

    def _stop_derivation(self) -> None:
        process = self._derivation_process
        if process is not None and process.poll() is None:
            process.kill()

    def on_hub_config_fetched(self, message: HubConfigFetched) -> None:
        if message.error is None:
            self._apply_model_path(message.hub_id)
        else:
            self.planner.edited = "model_path"
            self.planner.field_errors["model_path"] = message.error
            self.refresh_plan(changed_key="model_path")

    def apply_preset(self, kind: str, preset_id: str) -> None:
        """A palette choice: a model, a GPU or a recipe, applied over the current options."""
        from memtui.engine.model import presets

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
        if panel is not None and self._early_keys is None:  # not before they are all mounted (options_ready)
            panel.sync()

    def _show_field_errors(self) -> None:
        """Each refused value's reason beside its field (the panel may not be mounted yet)."""
        panel, result = self.options_panel, self.result
        if panel is None or result is None:
            return
        errors = {key: error_text(error) for key, error in self.planner.field_errors.items()}
        if result.error is not None:
            for field in result.error_fields:
                errors.setdefault(field, error_text(result.error))
        panel.show_errors(errors)

    def refresh_plan(self, changed_key: str | None = None) -> None:
        """Recompute and redraw every read-out; `changed_key` is the option just edited.

        The budget is one estimate and draws at once; a ladder not built before follows from a worker.
        """
        planner = self.planner
        result = planner.compute(ladder=False)  # the budget now; a ladder not built before comes from a worker
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
        self.query_one(StageTable).show(result.budget)
        self._show_ladder(result, changed_key)
        self.query_one(PinSummary).show(result, planner.pinned)
        notes = self.query_one("#notes", Text)
        budget_notes = result.budget.notes if result.budget is not None else []
        notes.display = bool(budget_notes)
        notes.set(Content("\n").join(Content.assemble(("note: ", "bold"), note) for note in budget_notes))
        self.query_one("#plan").set_class(result.stale, "-stale")
        self._look_for_fit(result)
        if result.to_derive is not None and result.to_derive != self._deriving:
            self._stop_derivation()  # options changed again: the previous trace is not wanted any more
            self._deriving = result.to_derive
            self.derive_generic(result.to_derive)
        if result.budget is not None and result.model is not None and result.gpu is not None:
            self.sub_title = f"{result.model.name} on {result.config.gpus if result.config else 1}x {result.gpu.name}"

    # ---- the savings ladder ------------------------------------------------------------
    def _show_ladder(self, result: PlanResult, changed_key: str | None) -> None:
        """Draw the ladder of the configuration the budget shows (the last valid one while an input is refused).

        A ladder not built before comes from a worker; until it arrives the one shown is marked as not
        being the budget's, so the two never silently disagree.
        """
        view = self.query_one(LadderView)
        if result.ladder is not None:
            self._ladder_building = None
            view.show(result.ladder, changed_key=changed_key, stale=result.stale)
            return
        if result.config is None or result.gpu is None:
            return
        view.mark_pending(stale=result.stale)
        if changed_key is not None:
            self._ladder_changed_key = changed_key
        if self._ladder_building != (result.config, result.gpu):  # that one is on its way already
            self._ladder_building = (result.config, result.gpu)
            # After the budget is drawn: the worker thread would otherwise delay that frame.
            self.call_after_refresh(self.build_ladder, result.config, result.model, result.gpu)

    @work(thread=True, exclusive=True, exit_on_error=False, group="ladder")
    def build_ladder(self, config: Any, model: Any, gpu: Any) -> None:
        from memtui.engine.planning.ladder import savings_ladder

        try:
            ladder = savings_ladder(config, model=model, gpu=gpu)
        except Exception as error:  # the budget is still right; only the ladder is missing
            self.log.warning(f"ladder failed: {error!r}")
            ladder = None
        self.post_message(LadderBuilt(config, gpu, ladder))

    def on_ladder_built(self, message: LadderBuilt) -> None:
        if self._ladder_building == (message.config, message.gpu):
            self._ladder_building = None
        if message.ladder is None:
            return
        self.planner.remember_ladder(message.config, message.gpu, message.ladder)
        result = self.result
        if result is None or result.config != message.config or result.gpu != message.gpu:
            return  # the options changed again; their own ladder is on its way
        self.result = replace(result, ladder=message.ladder)
        views = self.query(LadderView)
        if not views:
            return  # the app is shutting down
        views.first().show(message.ladder, changed_key=self._ladder_changed_key, stale=result.stale)
        self._ladder_changed_key = None

    # ---- actions -----------------------------------------------------------------
    @on(OptionList.OptionSelected, "#ladder-list")
    def explain_ladder_step(self) -> None:
        """Enter or a click on a ladder step (or ? while the ladder has focus): why that step helped."""
        from memtui.tui.explain import EXPLAINERS, LADDER_INTRO
        from memtui.tui.screens.explain_screen import ExplainScreen

        step = self.query_one(LadderView).highlighted_step()
        if step is not None and not step.is_baseline:
            explainer = EXPLAINERS[step_explainer_key(step)]
            self.push_screen(ExplainScreen(explainer.markdown(), footer=f"Ladder step: {step.label}"))
        else:
            self.push_screen(ExplainScreen(LADDER_INTRO))

    def action_explain(self) -> None:
        from memtui.tui.explain import EXPLAINERS, OVERVIEW
        from memtui.tui.screens.explain_screen import ExplainScreen  # Markdown is only needed once asked

        focused = self.focused
        if isinstance(focused, OptionList) and focused.id == "ladder-list":
            self.explain_ladder_step()
            return
        panel = self.options_panel
        row = panel.row_for(focused) if panel is not None else None
        if row is not None and row.spec.key == "stack":
            from memtui.tui.explain import stack_explainer

            self.push_screen(ExplainScreen(stack_explainer(self.planner.options["stack"])))
            return
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
        from memtui.engine.planning.export import export_budget

        result = self.result
        if result is None or result.budget is None or result.stale:
            self.notify("Fix the highlighted input first: exports are for a valid budget.", severity="warning",
                        title="Export")
            return
        title = None
        if result.model is not None and result.gpu is not None and result.config is not None:
            title = f"{result.model.name} on {result.config.gpus}x {result.gpu.name}"
        ladder = result.ladder
        if ladder is None and result.config is not None and result.gpu is not None:
            ladder = self.planner.build_ladder(result.config, result.model, result.gpu)  # not built yet: now
        budget = result.budget
        if result.config is not None and result.model is not None and result.gpu is not None:
            from memtui.engine.estimator.reserved import with_reserved

            # What `memtui estimate --json` prints: the allocator replay too (cached once the table has shown it).
            budget = with_reserved(budget, result.config, result.model, result.gpu)
        try:
            paths = export_budget(budget, ladder=ladder, title=title)
        except (InputError, OSError) as error:  # MEMTUI_EXPORT_DIR unusable: say so, keep the app running
            self.notify(f"Could not write the export: {error}", severity="error", title="Export", markup=False)
            return
        self.last_export = paths
        self.notify(f"{paths.markdown}\n{paths.json}", title="Exported", timeout=10, markup=False)

    # ---- how to make it fit ---------------------------------------------------------
    def _look_for_fit(self, result: PlanResult) -> None:
        """Under "does not fit", ask memtui.engine.planning.fit for the least invasive change that fits (in a worker)."""
        hint = self.query_one(FitHint)
        if self._fit_timer is not None:
            self._fit_timer.stop()
            self._fit_timer = None
        if result.stale or result.budget is None or result.budget.fits or result.config is None:
            self.fit_suggestion = None
            hint.show(None)
            return
        if self.fit_suggestion is not None and self.fit_suggestion[0] == result.config:
            return
        hint.show(self.fit_suggestion[1] if self.fit_suggestion else None, pending=True)
        # A search takes up to half a second of CPU: wait until the typing stops, so a burst of edits
        # starts one search, not one thread per keystroke.
        config, model, gpu = result.config, result.model, result.gpu
        self._fit_timer = self.set_timer(FIT_SEARCH_DELAY, lambda: self.find_fit(config, model, gpu))

    @work(thread=True, exclusive=True, exit_on_error=False, group="fit")
    def find_fit(self, config: Any, model: Any, gpu: Any) -> None:
        from memtui.engine.planning.fit import suggest

        try:
            suggestion = suggest(config, model=model, gpu=gpu)
        except Exception as error:  # a search that fails only costs the hint
            self.log.warning(f"fit search failed: {error!r}")
            suggestion = None
        self.post_message(FitFound(config, suggestion))

    def on_fit_found(self, message: FitFound) -> None:
        result = self.result
        if result is None or result.stale or result.config != message.config:
            return  # an answer for options already changed again
        self.fit_suggestion = (message.config, message.suggestion)
        hints = self.query(FitHint)
        if hints:  # none while the app shuts down
            hints.first().show(message.suggestion)

    def action_make_it_fit(self) -> None:
        suggestion = self.fit_suggestion[1] if self.fit_suggestion else None
        result = self.result
        if suggestion is None or suggestion.plan is None or result is None or result.config is None:
            fits = result is not None and result.budget is not None and result.budget.fits and not result.stale
            self.notify("It fits already." if fits else "No change found that fits (yet).", title="Make it fit")
            return
        plan, before = suggestion.plan, result.config.model_dump()
        changes = {key: value for key, value in plan.config.model_dump().items() if before[key] != value}
        if "gpu" in changes:
            self._gpu_chosen_by_user = True
        notes = self.planner.apply_options(changes)
        self._sync_inputs()
        self.refresh_plan(changed_key=next(iter(changes), None))
        steps = "\n".join(f"• {step.title}: {step.reason}" for step in plan.steps)
        self.notify("\n".join([steps, *notes]), title=f"Applied: {plan.summary}", timeout=12, markup=False)

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT_THEME if self.current_theme.dark else DARK_THEME

    # ---- the live run (tui/live) ---------------------------------------------------
    def _live_config(self):
        """The configuration a live run would train, or None (with a notice) while an input is invalid."""
        result = self.result
        if result is None or result.config is None or result.stale:
            self.notify("Fix the highlighted input first: a live run is for a valid configuration.",
                        severity="warning", title="Live run")
            return None
        return result.config

    def action_live_run(self) -> None:
        config = self._live_config()
        if config is None:
            return
        self.show_panel("live-panel")
        self.query_one(LivePanel).start_run(config)
        self.refresh_bindings()

    def action_live_settings(self) -> None:
        from memtui.tui.screens.live_settings import LiveSettingsScreen

        if self._live_config() is None or self.query_one(LivePanel).running:
            if self.query_one(LivePanel).running:
                self.notify("A live run is going; press s to stop it first.", severity="warning", title="Live run")
            return
        self.push_screen(LiveSettingsScreen(self.live_settings), self._apply_live_settings)

    def _apply_live_settings(self, settings) -> None:
        if settings is None:
            return
        self.live_settings = settings
        self.query_one(LivePanel).options = settings.live_options()
        self.action_live_run()

    def action_stop_run(self) -> None:
        self.query_one(LivePanel).stop_run()

    def action_show_budget(self) -> None:
        self.show_panel("plan")
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """s only while a run goes on, b only while the live panel is shown."""
        if action in ("stop_run", "show_budget"):
            panels = self.query(LivePanel)
            if not panels:
                return False
            if action == "stop_run":
                return panels.first().running
            return self.query_one("#right", ContentSwitcher).current == "live-panel"
        return True


def run_app(config: TrainingConfig | None = None, *, gpu_chosen: bool = False) -> int:
    """`memtui`, with no arguments or on a configuration; `gpu_chosen`: keep its GPU over the one found here."""
    app = MemtuiApp(gpu_detector=None if os.environ.get("MEMTUI_NO_GPU_DETECT") else detect_local_gpu,
                    options=config.model_dump() if config is not None else None)
    app._gpu_chosen_by_user = gpu_chosen
    app.run()
    return app.return_code or 0
