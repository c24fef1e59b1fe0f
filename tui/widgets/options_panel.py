"""The planner's inputs, grouped, each with its one-line description and room for an inline error."""

from __future__ import annotations

from typing import Any

from textual import events, on
from textual.app import ComposeResult
from textual.containers import Container, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Select, Static

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.hub import names_hub_repo
from memtui.engine.model.options import OPTIONS
from memtui.engine.telemetry.local_gpu import LocalGpu
from memtui.engine.model.specs import GpuSpec
from memtui.engine.units import GiB
from memtui.tui.option_specs import GROUPS, OptionSpec
from memtui.tui.planner import LOCAL_GPU, Planner


class EditingInput(Input):
    """An Input that runs its editing keys itself instead of through the binding chain.

    A bound key (backspace, arrows...) bubbles through every ancestor before its binding
    runs, while printable keys are inserted at once; in a burst of keys (fast typing,
    or SSH delivering several in one packet) "⌫ 1 6" then becomes "1 6 ⌫". Handling
    the editing keys here keeps them in order.
    """

    EDIT_ACTIONS = {
        "backspace": "delete_left", "delete": "delete_right", "left": "cursor_left", "right": "cursor_right",
        "home": "home", "end": "end", "ctrl+a": "home", "ctrl+e": "end", "ctrl+k": "delete_right_all",
        "ctrl+u": "delete_left_all", "ctrl+w": "delete_left_word",
    }

    # Textual calls each class's _on_key in MRO order until one calls prevent_default().
    async def _on_key(self, event: events.Key) -> None:
        action = self.EDIT_ACTIONS.get(event.key)
        if action is not None:
            event.stop()
            event.prevent_default()
            await self.run_action(action)


class IntInput(EditingInput):
    """A whole-number field. Like every input it keeps each printable key while focused (so `q` or `r`
    typed here never quits or starts a run); a key that is not a digit is refused in place."""

    DIGITS = "0123456789-"
    INPUT_TYPE = "integer"
    REFUSAL = "digits only"

    class Refused(Message):
        """A printable key that is not a digit was typed (and not inserted)."""

        def __init__(self, field: IntInput, character: str) -> None:
            super().__init__()
            self.field = field
            self.character = character

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(type=self.INPUT_TYPE, compact=True, **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.is_printable and event.character is not None and event.character not in self.DIGITS:
            event.stop()
            event.prevent_default()  # Input would drop it silently; say why instead
            self.post_message(self.Refused(self, event.character))


class DecimalInput(IntInput):
    """A decimal-number field (a probability such as LoRA dropout): digits and one decimal point."""

    DIGITS = "0123456789.-"
    INPUT_TYPE = "number"
    REFUSAL = "a decimal number only"


def model_choices(models: dict[str, ModelSpec], custom: list[str]) -> list[tuple[str, str]]:
    choices = [(f"{spec.name} ({spec.id})", spec.id) for spec in models.values()]
    choices += [(f"{'Hub' if names_hub_repo(name, models) else 'file'}: {name}", name) for name in custom]
    return choices


def gpu_choices(gpus: dict[str, GpuSpec], local: LocalGpu | None) -> list[tuple[str, str]]:
    choices = []
    if local is not None:
        choices.append((f"This machine: {local.nvml_name} ({local.memory_total / GiB:.1f} GiB)", LOCAL_GPU))
    # "GeForce" adds width, not information, in a narrow picker.
    choices += [(f"{gpu.name.removeprefix('GeForce ')} ({gpu.memory_bytes / GiB:.1f} GiB)", gpu.id)
                for gpu in gpus.values()]
    return choices


def switch_label(value: bool) -> str:
    """A switch says its state in words: the box alone reads the same on and off in some themes."""
    return "on" if value else "off"


class OptionRow(Container):
    """Label and control on one line; under them the one-line description, or the error when refused."""

    def __init__(self, spec: OptionSpec, control: Widget) -> None:
        super().__init__(id=f"row-{spec.key}", classes="option-row")
        self.spec = spec
        self.control = control
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield Label(self.spec.label, classes="option-label")
        yield self.control
        yield Static(self.spec.summary, classes="option-note", markup=False)

    def set_error(self, message: str | None) -> None:
        if message == self.error:
            return
        self.error = message
        self.set_class(message is not None, "-invalid")
        note = self.query_one(".option-note", Static)
        note.update(f"✘ {message}" if message else self.spec.summary)


class OptionsPanel(VerticalScroll, can_focus=False):
    """Every estimator option as a control. Posts `OptionsPanel.Changed` for each edit the user makes."""

    class Changed(Message):
        """An option edited: `value` is typed for pickers and switches, the raw text for typed fields."""

        def __init__(self, key: str, value: Any) -> None:
            super().__init__()
            self.key = key
            self.value = value

    class Ready(Message):
        """The panel has mounted (it mounts lazily, after the first frame)."""

    def __init__(self, planner: Planner, models: dict[str, ModelSpec], gpus: dict[str, GpuSpec], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.planner = planner
        self.models = models
        self.gpus = gpus
        self.custom_models: list[str] = []
        self.rows: dict[str, OptionRow] = {}
        # The controls were built from the options of the moment the panel composed; a palette pick while they
        # mount changes the options, and their mount-time change events would undo it. Until the app's first
        # sync (on Ready), no control event is a user's edit.
        self.synced = False

    def compose(self) -> ComposeResult:
        for title, specs in GROUPS:
            yield Static(title, classes="group-title")
            for spec in specs:
                yield OptionRow(spec, self._control(spec))

    def _control(self, spec: OptionSpec) -> Widget:
        options = self.planner.options
        tooltip = spec.summary
        control_id = f"opt-{spec.key}"
        if spec.kind == "model":
            return Select(model_choices(self.models, self.custom_models), value=options["model"], allow_blank=False,
                          compact=True, id=control_id, tooltip="Type to search the presets")
        if spec.kind == "gpu":
            return Select(gpu_choices(self.gpus, self.planner.local_gpu), value=self.planner.gpu_choice,
                          allow_blank=False, compact=True, id=control_id, tooltip=tooltip)
        if spec.kind == "path":
            return EditingInput(placeholder="path or org/name", compact=True, id=control_id,
                         tooltip="A Hugging Face config.json (or its folder), or a Hub id such as "
                                 "meta-llama/Llama-3.1-8B; Enter loads it")
        if spec.kind == "int":
            return IntInput(value=str(options[spec.key]), id=control_id, tooltip=tooltip)
        if spec.kind == "float":
            return DecimalInput(value=str(options[spec.key]), id=control_id, tooltip=tooltip)
        if spec.kind == "switch":
            value = bool(options[spec.key])
            return Checkbox(switch_label(value), value=value, compact=True, id=control_id, tooltip=tooltip)
        if spec.kind == "text":
            return EditingInput(value=str(options[spec.key]), compact=True, id=control_id, tooltip=tooltip)
        value = str(options[spec.key])
        return Select([(choice, choice) for choice in spec.choices], value=value, allow_blank=False,
                      compact=True, id=control_id, tooltip=tooltip)

    def on_mount(self) -> None:
        self.rows = {row.spec.key: row for row in self.query(OptionRow)}
        self.post_message(self.Ready())

    # ---- user edits ----------------------------------------------------------
    @staticmethod
    def _key(widget: Widget) -> str | None:
        return widget.id[4:] if widget.id and widget.id.startswith("opt-") else None

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        event.stop()
        key = self._key(event.select)
        # A change queued before the app set the control (a palette pick while the inputs mount) is stale.
        if not self.synced or key is None or event.value is Select.NULL or event.value != event.select.value:
            return
        value: Any = OPTIONS[key].from_text(event.value) if key in OPTIONS else event.value
        current = self.planner.gpu_choice if key == "gpu" else self.planner.options.get(key)
        if value != current:
            self.post_message(self.Changed(key, value))

    @on(Checkbox.Changed)
    def _checkbox_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        key = self._key(event.checkbox)
        if not self.synced or event.value != event.checkbox.value:
            return  # stale: the app has set the switch since
        event.checkbox.label = switch_label(event.value)
        if key is not None and event.value != self.planner.options.get(key):
            self.post_message(self.Changed(key, event.value))

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        event.stop()
        key = self._key(event.input)
        if not self.synced or key is None or key == "model_path":
            return  # a path loads on Enter, not on every keystroke
        if key not in self.planner.field_errors and event.value == str(self.planner.options.get(key)):
            return  # the app set this value itself
        self.post_message(self.Changed(key, event.value))

    @on(IntInput.Refused)
    def _int_refused(self, event: IntInput.Refused) -> None:
        event.stop()
        row = self.row_for(event.field)
        if row is not None:
            row.set_error(f"{event.field.REFUSAL}: {event.character!r} is not one")

    @on(Input.Submitted, "#opt-model_path")
    def _path_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Changed("model_path", event.value))

    # ---- the app's view of the state -------------------------------------------
    def sync(self) -> None:
        """Make every control show the planner's options (after a recipe, a palette pick, the local GPU)."""
        # Programmatic changes must not come back as user edits.
        with self.prevent(Select.Changed, Input.Changed, Checkbox.Changed):
            self._sync()
        self.synced = True

    def _sync(self) -> None:
        options = self.planner.options
        model_select = self.query_one("#opt-model", Select)
        model = options["model"]
        if model not in self.models and model not in self.custom_models:
            self.custom_models.append(model)
            model_select.set_options(model_choices(self.models, self.custom_models))
        model_select.value = model
        gpu_select = self.query_one("#opt-gpu", Select)
        gpu_select.set_options(gpu_choices(self.gpus, self.planner.local_gpu))
        gpu_select.value = self.planner.gpu_choice
        for _, specs in GROUPS:
            for spec in specs:
                if spec.kind in ("int", "float", "text"):
                    field = self.query_one(f"#opt-{spec.key}", Input)
                    text = str(options[spec.key])
                    if field.value != text:
                        field.value = text
                elif spec.kind == "switch":
                    checkbox = self.query_one(f"#opt-{spec.key}", Checkbox)
                    checkbox.value = bool(options[spec.key])
                    checkbox.label = switch_label(checkbox.value)
                elif spec.kind == "select":
                    self.query_one(f"#opt-{spec.key}", Select).value = str(options[spec.key])

    def show_errors(self, errors: dict[str, str]) -> None:
        """Mark the fields named in `errors` (key -> message); clear every other one."""
        for key, row in self.rows.items():
            row.set_error(errors.get(key))

    def scroll_to_field(self, key: str) -> None:
        rows = self.query(f"#row-{key}")
        if rows:
            self.scroll_to_widget(rows.first(), animate=False)

    def row_for(self, widget: Widget | None) -> OptionRow | None:
        """The option row a (focused) widget belongs to, if any."""
        while widget is not None:
            if isinstance(widget, OptionRow):
                return widget
            widget = widget.parent if isinstance(widget.parent, Widget) else None
        return None
