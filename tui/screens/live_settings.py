"""The live run's own knobs (key R): device, steps and the scaled model's size, then run.

Empty means automatic: memtui sizes the copy to fit a quarter of the free memory
and finish in about a minute. Each value is checked as it is typed (refused in
place with the reason, as the planner's inputs are), and the form shows what
the copy resolves to for the current model, and why. The settings stay for
every later run of the session, whatever the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

DEVICES = (("auto: CUDA when NVML sees a GPU", "auto"), ("cpu", "cpu"), ("cuda", "cuda"))
LIMITS = {"steps": (1, 1000), "layers": (1, 512), "width": (64, 65536)}
LABELS = {"steps": "Steps", "layers": "Layers", "width": "Width"}
HINTS = {
    "steps": "training steps (empty: 3 on CPU, 10 on CUDA)",
    "layers": "decoder layers of the copy (empty: sized to fit)",
    "width": "hidden size of the copy, heads follow (empty: sized to fit)",
}


@dataclass(frozen=True)
class LiveSettings:
    device: str = "auto"
    steps: int | None = None
    layers: int | None = None
    width: int | None = None

    def live_options(self) -> Any:
        """The run's LiveOptions; an option this device cannot run is left out, and the panel says so at its top."""
        from memtui.engine.live.plan import LiveOptions

        return LiveOptions(device=self.device, steps=self.steps, layers=self.layers, width=self.width,
                           if_unsupported="skip")


def _screen_words(text: str) -> str:
    """The CLI's flag names as this form's labels ('--width: ...' -> 'Width: ...')."""
    for field, label in LABELS.items():
        text = text.replace(f"--{field}", label)
    return text


def parse_size(field: str, text: str) -> int | None:
    """'' -> None (automatic); a whole number within LIMITS[field]; else ValueError naming the field."""
    text = text.strip()
    if not text:
        return None
    low, high = LIMITS[field]
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{LABELS[field]}: {text!r} is not a whole number (allowed: {low}..{high}, or empty)") from None
    if not low <= value <= high:
        raise ValueError(f"{LABELS[field]}: {value} is out of range (allowed: {low}..{high}, or empty)")
    return value


SCOPE = ("These settings stay for every later live run (r) in this session, whatever the model; "
         "empty fields are sized anew for each model.")


class SizeResolved(Message):
    """What the form's values resolve to for the current model: lines to show, or the reason they cannot."""

    def __init__(self, lines: list[str], problem: str = "") -> None:
        super().__init__()
        self.lines = lines
        self.problem = problem


class LiveSettingsScreen(ModalScreen["LiveSettings | None"]):
    """A small form over the planner; Enter or Run starts the run, Escape cancels."""

    DEFAULT_CSS = """
    #live-settings-resolved { height: auto; color: $text-muted; margin-top: 1; }
    #live-settings-scope { height: auto; color: $text-muted; text-style: italic; }
    .live-settings-row Input.-refused { border: tall $error; }
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", tooltip="Back without running"),
    ]

    def __init__(self, current: LiveSettings | None = None, config: Any = None) -> None:
        super().__init__()
        self.current = current or LiveSettings()
        self.config = config  # the TrainingConfig a run would train; None: the app's current one

    def compose(self) -> ComposeResult:
        with Vertical(id="live-settings-card"):
            yield Static("Live run: a scaled-down copy of this configuration, trained for real", id="live-settings-title")
            with Horizontal(classes="live-settings-row"):
                yield Label("Device", classes="live-settings-label")
                yield Select(DEVICES, value=self.current.device, allow_blank=False, id="live-device")
            for field in LIMITS:
                value = getattr(self.current, field)
                with Horizontal(classes="live-settings-row"):
                    yield Label(LABELS[field], classes="live-settings-label")
                    yield Input("" if value is None else str(value), placeholder=HINTS[field], id=f"live-{field}",
                                type="integer", valid_empty=True)
            yield Static("", id="live-settings-error")
            yield Static("", id="live-settings-resolved", markup=False)
            yield Static(SCOPE, id="live-settings-scope")
            with Horizontal(id="live-settings-buttons"):
                yield Button("Run", variant="primary", id="live-settings-run")
                yield Button("Cancel", id="live-settings-cancel")
            yield Static("Enter runs · Esc cancels · empty fields are sized automatically", id="live-settings-hint")

    def on_mount(self) -> None:
        self.query_one("#live-steps", Input).focus()
        self._check()

    # ---- checked as typed ------------------------------------------------------------------
    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._check()

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._check()

    def _check(self) -> LiveSettings | None:
        """Mark each field that cannot work and say why; resolve the size when all can."""
        error = self.query_one("#live-settings-error", Static)
        problems = []
        for field in LIMITS:
            box = self.query_one(f"#live-{field}", Input)
            try:
                parse_size(field, box.value)
                box.remove_class("-refused")
            except ValueError as problem:
                box.add_class("-refused")
                problems.append(str(problem))
        error.update("\n".join(problems))
        error.set_class(bool(problems), "-shown")
        if problems:
            self.query_one("#live-settings-resolved", Static).update("")
            return None
        settings = self.settings()
        config = self._config()
        if config is not None:
            self._resolve(config, settings)
        return settings

    def _config(self) -> Any:
        if self.config is not None:
            return self.config
        result = getattr(self.app, "result", None)
        return getattr(result, "config", None)

    @work(thread=True, exclusive=True, exit_on_error=False, group="live-settings-resolve")
    def _resolve(self, config: Any, settings: LiveSettings) -> None:
        """Plan the run as `r` would (device, sizing, prediction): pure Python, but off the UI thread."""
        from memtui.engine.errors import InputError
        from memtui.engine.live.devices import detect
        from memtui.engine.live.plan import explain_size, make_plan

        options = settings.live_options()
        try:
            device, note = detect(options.device)
            if device is None:
                self.post_message(SizeResolved([], f"the worker will size the copy once CUDA is up ({note})"))
                return
            plan = make_plan(config, options, device)
        except InputError as problem:
            self.post_message(SizeResolved([], _screen_words(str(problem))))
            return
        lines = [f"{config.model} on {device.name}:", *explain_size(plan, options)]
        self.post_message(SizeResolved(lines, _screen_words(plan.refusal)))

    def on_size_resolved(self, event: SizeResolved) -> None:
        event.stop()
        text = "\n".join(event.lines)
        if event.problem:
            text = (text + "\n" if text else "") + f"Would not start: {event.problem}"
        self.query_one("#live-settings-resolved", Static).update(text)

    def settings(self) -> LiveSettings:
        """The form's values; ValueError (naming the field and the allowed values) if one cannot work."""
        sizes = {field: parse_size(field, self.query_one(f"#live-{field}", Input).value) for field in LIMITS}
        device = self.query_one("#live-device", Select).value
        return LiveSettings(device=str(device), **sizes)

    def _submit(self) -> None:
        settings = self._check()
        if settings is not None:
            self.dismiss(settings)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "live-settings-run":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
