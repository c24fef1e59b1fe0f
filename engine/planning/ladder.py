"""The savings ladder: from the unoptimized 16-bytes-per-parameter step to the current one.

The baseline is the current configuration with every memory optimization
switched off (fp32 weights, gradients and AdamW states, eager attention, no
checkpointing, no adapters, no sharding). Each rung then switches back on one
optimization the current configuration uses, in a fixed order, so a reader
sees what each one removes. The last rung is the current configuration.

Some options are invalid on their own (int8/nf4 needs LoRA, offload needs
ZeRO, ...). The order puts prerequisites first; if a rung is still invalid
under the estimator's rules, it is merged with the next one and both are
applied together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.errors import InputError
from memtui.engine.model.options import OPTIONS
from memtui.engine.model.specs import COMPONENT_NAMES, Budget, GpuSpec, TrainingConfig

# What "unoptimized" means: each option at its most memory-hungry, plain setting (the registry's baselines).
BASELINE_OPTIONS: dict[str, Any] = {
    option.field: option.baseline for option in OPTIONS.values() if option.baseline is not None
}


def _label(field: str, config: TrainingConfig) -> str:
    return OPTIONS[field].ladder_label(config)


# Appended to the label of a rung that grows the device peak (e.g. autocast's 16-bit copies on top
# of fp32 weights while activations are small): what the ladder shows is a cost, not a saving.
COSTS_MEMORY = " (costs memory here)"


@dataclass(frozen=True)
class _Rung:
    """One optimization the current configuration uses: its key, label and the fields it sets."""

    key: str
    label: str
    fields: tuple[str, ...]


def _rungs(config: TrainingConfig) -> list[_Rung]:
    """The optimizations `config` enables, in the order the ladder applies them.

    Model-state savers come first (they are the 16 bytes/param story), then
    sharding, then what shrinks activations. Prerequisites come before what
    needs them: precision before quantization, LoRA before quantization,
    ZeRO before offload.
    """
    rungs: list[_Rung] = []
    if config.precision != "32-true":
        label = _label("precision", config)
        if config.master_weights:
            label += " + " + _label("master_weights", config)
        rungs.append(_Rung("precision", label, ("precision", "master_weights")))
    # Then each option that is its own rung, in the ladder's order, when it differs from the baseline.
    for key in ("optimizer", "optimizer_impl", "lora_rank", "quant", "lora_dtype", "tp", "pp", "zero", "offload",
                "attention", "checkpointing", "compile", "float8", "loss", "optimizer_in_backward", "activation_offload"):
        if getattr(config, key) == BASELINE_OPTIONS[key]:
            continue
        label = _label(key, config)
        fields: tuple[str, ...] = (key,)
        if key == "zero" and config.dp > 1:
            label += f" over {config.dp} ranks"
        if key == "quant" and config.kbit_prep:  # peft's k-bit prep needs the quantized base: one rung
            label += " + " + _label("kbit_prep", config)
            fields = ("quant", "kbit_prep")
        if key == "loss" and config.loss_dtype != BASELINE_OPTIONS["loss_dtype"]:  # the dtype of that loss: one rung
            label += " + " + _label("loss_dtype", config)
            fields = ("loss", "loss_dtype")
        rungs.append(_Rung(key, label, fields))
    return rungs


@dataclass(frozen=True)
class LadderStep:
    """One rung: the configuration after applying `keys`, its budget, and what that removed."""

    keys: tuple[str, ...]  # option keys applied at this rung ("baseline" for the first)
    label: str
    config: TrainingConfig
    budget: Budget
    removed: dict[str, int] = field(default_factory=dict)  # per component at the peak, bytes; <0 = added
    removed_total: int = 0  # device peak bytes removed by this rung (negative when it adds memory)

    @property
    def is_baseline(self) -> bool:
        return self.keys == ("baseline",)


@dataclass(frozen=True)
class SavingsLadder:
    steps: tuple[LadderStep, ...]

    @property
    def baseline(self) -> LadderStep:
        return self.steps[0]

    @property
    def final(self) -> LadderStep:
        return self.steps[-1]

    @property
    def removed_total(self) -> int:
        return self.baseline.budget.device_peak_bytes - self.final.budget.device_peak_bytes


def _components(budget: Budget) -> dict[str, int]:
    components = budget.per_gpu.model_dump()
    return {name: components[name] for name in COMPONENT_NAMES}


def baseline_config(config: TrainingConfig) -> TrainingConfig:
    """`config` with every memory optimization off: the 16 bytes/param starting point."""
    return config.model_copy(update=BASELINE_OPTIONS)


def savings_ladder(
    config: TrainingConfig, *, model: ModelSpec | None = None, gpu: GpuSpec | None = None
) -> SavingsLadder:
    """Apply the optimizations `config` uses one at a time, from the unoptimized baseline.

    Raises InputError only if `config` itself (or its baseline) is invalid.
    """
    from memtui.engine.estimator import estimate  # the estimator imports presets; keep this module light

    base = baseline_config(config)
    previous = estimate(base, model=model, gpu=gpu)
    steps = [LadderStep(keys=("baseline",), label="unoptimized: fp32 + AdamW, eager", config=base, budget=previous)]
    current = base
    pending: list[_Rung] = []
    for rung in _rungs(config):
        pending.append(rung)
        candidate = current.model_copy(update={name: getattr(config, name) for r in pending for name in r.fields})
        try:
            budget = estimate(candidate, model=model, gpu=gpu)
        except InputError:
            continue  # invalid alone: apply it together with the next rung
        before, after = _components(previous), _components(budget)
        removed_total = previous.device_peak_bytes - budget.device_peak_bytes
        label = " + ".join(r.label for r in pending)
        if removed_total < 0:  # a "saving" that adds memory at this point of the ladder says so
            label += COSTS_MEMORY
        steps.append(
            LadderStep(
                keys=tuple(r.key for r in pending),
                label=label,
                config=candidate,
                budget=budget,
                removed={name: before[name] - after[name] for name in COMPONENT_NAMES},
                removed_total=removed_total,
            )
        )
        current, previous, pending = candidate, budget, []
    if pending:
        # Only reachable if the full configuration is invalid; let the estimator say why.
        estimate(config, model=model, gpu=gpu)
    return SavingsLadder(steps=tuple(steps))


__all__ = ["BASELINE_OPTIONS", "COSTS_MEMORY", "LadderStep", "SavingsLadder", "baseline_config", "savings_ladder"]
