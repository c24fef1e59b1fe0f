"""The planner's state, without any widgets: options in, budget and ladder out.

The app keeps one Planner. Every input change goes through it; it answers
with a PlanResult holding either a fresh budget or the error that names the
offending field, plus the last good budget so the screen never goes blank.
Keeping this free of Textual makes the rules testable in microseconds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.errors import DerivationNeeded, InputError
from memtui.engine.model.options import OPTIONS
from memtui.engine.telemetry.local_gpu import LocalGpu
from memtui.engine.model.specs import Budget, GpuSpec, Recipe, TrainingConfig

if TYPE_CHECKING:  # the ladder module loads with the first ladder, after the first frame
    from memtui.engine.planning.ladder import SavingsLadder

LOCAL_GPU = "@local"  # the GPU picker's value for "the GPU in this machine"

@dataclass(frozen=True)
class PlanResult:
    """What the screen shows: the budget for the current options, or why there is none."""

    budget: Budget | None  # the budget to draw: current if error is None, else the last good one
    ladder: SavingsLadder | None
    config: TrainingConfig | None
    error: InputError | None = None
    gpu: GpuSpec | None = None
    model: ModelSpec | None = None
    error_field: str | None = None  # the option key the error belongs to ("lora_rank", "model_path")
    # Where to show the error: its field, and the field just edited when the refusal involves it too.
    error_fields: tuple[str, ...] = ()
    # A generic model's options whose step is not derived yet: the app traces them in a subprocess, then redraws.
    to_derive: TrainingConfig | None = None

    @property
    def stale(self) -> bool:
        return self.error is not None


class Planner:
    """Options (as TrainingConfig fields) plus the bits a flag cannot say: the local GPU, the pin."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = TrainingConfig().model_dump()
        if options:
            self.options.update(options)
        self.local_gpu: LocalGpu | None = None
        self.use_local_gpu = False
        self.field_errors: dict[str, InputError] = {}
        self.edited: str | None = None  # the option the user changed last
        self.last_good: PlanResult | None = None
        self.pinned: PlanResult | None = None
        self._models: dict[str, ModelSpec] = {}
        self._ladders: OrderedDict[tuple[str, str, int], SavingsLadder] = OrderedDict()

    # ---- lookups -----------------------------------------------------------
    def model_spec(self, name: str) -> ModelSpec:
        if name not in self._models:
            from memtui.engine.model.presets import resolve_model

            self._models[name] = resolve_model(name)
        return self._models[name]

    def gpu_spec(self) -> GpuSpec:
        if self.use_local_gpu and self.local_gpu is not None and self.options["gpu"] == self.local_gpu.spec.id:
            return self.local_gpu.spec
        from memtui.engine.model.presets import resolve_gpu

        return resolve_gpu(self.options["gpu"])

    @property
    def gpu_choice(self) -> str:
        """The GPU picker's value: a preset id or LOCAL_GPU."""
        return LOCAL_GPU if self.use_local_gpu and self.local_gpu is not None else self.options["gpu"]

    # ---- changes -----------------------------------------------------------
    def set_option(self, key: str, value: Any) -> list[str]:
        """Set one option (already the right type). Returns notes about automatic adjustments."""
        self.field_errors.pop(key, None)
        self.edited = key
        notes: list[str] = []
        if key == "gpu":
            if value == LOCAL_GPU and self.local_gpu is not None:
                self.use_local_gpu = True
                self.options["gpu"] = self.local_gpu.spec.id
            else:
                self.use_local_gpu = False
                self.options["gpu"] = value
            return notes
        if key == "stack":
            return self.apply_stack(value)
        if key == "model":
            self.field_errors.pop("model_path", None)
            self.options["model"] = value
            notes += self._fit_seq_len_to_model()
            return notes
        self.options[key] = value
        return notes

    def set_int_text(self, key: str, text: str) -> None:
        """A number typed into a field (whole, or decimal for a float option): accepted, or recorded as that
        field's error."""
        self.edited = key
        try:
            value = OPTIONS[key].parse_number(text)
        except InputError as error:
            self.field_errors[key] = error
            return
        self.set_option(key, value)

    def set_model_path(self, text: str) -> list[str]:
        """A path to a config.json (or a folder holding one): load it or record why not."""
        text = text.strip()
        if not text:
            self.field_errors["model_path"] = InputError("model", "type a path to a config.json")
            return []
        try:
            spec = self.model_spec(text)
        except InputError as error:
            self.field_errors["model_path"] = error
            return []
        self.field_errors.pop("model_path", None)
        self.options["model"] = text
        self._models[text] = spec
        return self._fit_seq_len_to_model()

    def apply_options(self, options: dict[str, Any]) -> list[str]:
        """A recipe's option set (or any partial dict) over the current options."""
        notes: list[str] = []
        self.field_errors.clear()
        for key, value in options.items():
            if key == "gpu":
                self.use_local_gpu = False
            self.options[key] = value
        if "model" in options:
            notes += self._fit_seq_len_to_model()
        return notes

    def apply_stack(self, stack: str) -> list[str]:
        """A training stack chosen: the options it sets (and those the previous one set) to its defaults for the
        model, adapters and GPUs chosen (memtui's own with none); its notes say what it approximates or does not
        model yet."""
        from memtui.engine.model.stacks import STACKS, planner_values

        values, notes = planner_values(stack, self.options, previous=self.options.get("stack", "none"))
        changed = {field: value for field, value in values.items() if self.options.get(field) != value}
        for field in (*values, "stack"):
            self.field_errors.pop(field, None)
        self.options.update(values, stack=stack)
        notes += self._fit_seq_len_to_model()
        name = "memtui's own defaults" if stack == "none" else f"{STACKS[stack].name}'s defaults"
        said = ", ".join(f"{field} {value}" for field, value in changed.items()) or "nothing changed"
        return [f"{name}: {said}.", *notes]

    def apply_recipe(self, recipe: Recipe) -> list[str]:
        return self.apply_options(dict(recipe.options))

    def set_local_gpu(self, local: LocalGpu | None, *, select: bool) -> None:
        """Record the detected GPU; `select` makes it the current choice."""
        self.local_gpu = local
        if local is not None and select:
            self.use_local_gpu = True
            self.options["gpu"] = local.spec.id

    def _fit_seq_len_to_model(self) -> list[str]:
        """Models with learned positions (GPT-2) cannot take longer sequences: clamp, and say so."""
        try:
            spec = self.model_spec(self.options["model"])
        except InputError:
            return []
        if spec.positions == "learned" and self.options["seq_len"] > spec.max_position_embeddings:
            self.options["seq_len"] = spec.max_position_embeddings
            self.field_errors.pop("seq_len", None)
            return [f"Sequence length set to {spec.max_position_embeddings}: {spec.name} has that many learned positions."]
        return []

    # ---- ladders ------------------------------------------------------------
    LADDERS_KEPT = 64

    @staticmethod
    def _ladder_key(config: TrainingConfig, gpu: GpuSpec) -> tuple[str, str, int]:
        return config.model_dump_json(), gpu.id, gpu.memory_bytes

    def known_ladder(self, config: TrainingConfig, gpu: GpuSpec) -> SavingsLadder | None:
        """The ladder for this configuration if it was built before (the app builds new ones in a worker)."""
        key = self._ladder_key(config, gpu)
        ladder = self._ladders.get(key)
        if ladder is not None:
            self._ladders.move_to_end(key)
        return ladder

    def remember_ladder(self, config: TrainingConfig, gpu: GpuSpec, ladder: SavingsLadder) -> None:
        """Keep a built ladder, and give it to the last good result (and the pin) when they are that config."""
        self._ladders[self._ladder_key(config, gpu)] = ladder
        while len(self._ladders) > self.LADDERS_KEPT:
            self._ladders.popitem(last=False)
        for name in ("last_good", "pinned"):
            result = getattr(self, name)
            if result is not None and result.ladder is None and result.config == config and result.gpu == gpu:
                setattr(self, name, replace(result, ladder=ladder))

    def build_ladder(self, config: TrainingConfig, model: ModelSpec | None, gpu: GpuSpec) -> SavingsLadder:
        """Build (one estimate per rung: up to a few hundred ms with the step simulator) and remember."""
        from memtui.engine.planning.ladder import savings_ladder

        ladder = savings_ladder(config, model=model, gpu=gpu)
        self.remember_ladder(config, gpu, ladder)
        return ladder

    # ---- results -----------------------------------------------------------
    def compute(self, *, ladder: bool = True) -> PlanResult:
        """The budget and ladder for the current options; on bad input, the error and the last good budget.

        With `ladder=False` the ladder is only looked up (None if it was never built): the budget is one
        estimate, the ladder one per rung, so the app draws the budget at once and builds the ladder aside.
        """
        from memtui.engine.estimator import estimate
        from memtui.engine.model.validation import config_from_options

        error: InputError | None = None
        error_field: str | None = None
        to_derive: TrainingConfig | None = None
        if self.field_errors:
            error_field, error = next(iter(self.field_errors.items()))
        else:
            try:
                config = config_from_options(self.options)
                model = self.model_spec(config.model)
                gpu = self.gpu_spec()
                budget = estimate(config, model=model, gpu=gpu)
                steps = self.build_ladder(config, model, gpu) if ladder else self.known_ladder(config, gpu)
            except InputError as raised:
                # Not an option's own field: it is about the model's config.json.
                error, error_field = raised, raised.field if raised.field in OPTIONS else "model_path"
                if isinstance(raised, DerivationNeeded):
                    to_derive = config
            else:
                result = PlanResult(budget=budget, ladder=steps, config=config, gpu=gpu, model=model)
                self.last_good = result
                return result
        last = self.last_good
        return PlanResult(
            budget=last.budget if last else None,
            ladder=last.ladder if last else None,
            config=last.config if last else None,
            error=error,
            gpu=last.gpu if last else None,
            model=last.model if last else None,
            error_field=error_field,
            error_fields=self._error_fields(error, error_field),
            to_derive=to_derive,
        )

    def _error_fields(self, error: InputError, error_field: str | None) -> tuple[str, ...]:
        """The refused field, and the one just edited when the refusal involves it (TP beside GPU count)."""
        fields = (error_field,) if error_field else ()
        if self.edited and self.edited not in fields and self.edited in error.fields:
            fields += (self.edited,)
        return fields

    def toggle_pin(self) -> bool:
        """Pin the last good result for comparison, or unpin. Returns whether a pin is now set."""
        if self.pinned is not None:
            self.pinned = None
            return False
        if self.last_good is None:
            return False
        self.pinned = self.last_good
        return True


def config_differences(pinned: TrainingConfig, current: TrainingConfig) -> list[tuple[str, Any, Any]]:
    """(field, pinned value, current value) for every option that differs."""
    before, after = pinned.model_dump(), current.model_dump()
    return [(key, before[key], after[key]) for key in after if before[key] != after[key]]


__all__ = ["LOCAL_GPU", "Planner", "PlanResult", "config_differences"]
