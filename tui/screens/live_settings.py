"""The live run's own knobs (key R): device, steps and the scaled model's size, then run.

Empty means automatic: memtui sizes the copy to fit a quarter of the free memory
and finish in about a minute. A value that cannot work is refused in place with
the reason, as the planner's inputs are.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
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


class LiveSettingsScreen(ModalScreen["LiveSettings | None"]):
    """A small form over the planner; Enter or Run starts the run, Escape cancels."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", tooltip="Back without running"),
    ]

    def __init__(self, current: LiveSettings | None = None) -> None:
        super().__init__()
        self.current = current or LiveSettings()

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
                    yield Input("" if value is None else str(value), placeholder=HINTS[field], id=f"live-{field}")
            yield Static("", id="live-settings-error")
            with Horizontal(id="live-settings-buttons"):
                yield Button("Run", variant="primary", id="live-settings-run")
                yield Button("Cancel", id="live-settings-cancel")
            yield Static("Enter runs · Esc cancels · empty fields are sized automatically", id="live-settings-hint")

    def on_mount(self) -> None:
        self.query_one("#live-steps", Input).focus()

    def settings(self) -> LiveSettings:
        """The form's values; ValueError (naming the field and the allowed values) if one cannot work."""
        sizes = {field: parse_size(field, self.query_one(f"#live-{field}", Input).value) for field in LIMITS}
        device = self.query_one("#live-device", Select).value
        return LiveSettings(device=str(device), **sizes)

    def _submit(self) -> None:
        error = self.query_one("#live-settings-error", Static)
        try:
            settings = self.settings()
        except ValueError as problem:
            error.update(str(problem))
            error.add_class("-shown")
            return
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
