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
from memtui.engine.model.specs import COMPONENT_NAMES, Budget, GpuSpec, TrainingConfig

# What "unoptimized" means: each option at its most memory-hungry, plain setting.
BASELINE_OPTIONS: dict[str, Any] = {
    "precision": "32-true",
    "master_weights": False,
    "optimizer": "adamw",
    "optimizer_impl": "foreach",
    "attention": "eager",
    "checkpointing": "none",
    "lora_rank": 0,
    "quant": "none",
    "tp": 1,
    "pp": 1,
    "zero": 0,
    "offload": "none",
}

_PRECISION_LABELS = {
    "16-mixed": "fp16 mixed precision (autocast)",
    "bf16-mixed": "bf16 mixed precision (autocast)",
    "16-true": "fp16 weights and gradients",
    "bf16-true": "bf16 weights and gradients",
}
_OPTIMIZER_LABELS = {
    "adamw-8bit": "8-bit AdamW states",
    "sgd": "plain SGD (no optimizer state)",
    "sgd-momentum": "SGD with momentum (one state)",
    "adafactor": "Adafactor (factored states)",
    "lion": "Lion (one state)",
    "galore-adamw": "GaLore AdamW",
}
_IMPL_LABELS = {"fused": "fused optimizer step", "for-loop": "for-loop optimizer step"}
_CHECKPOINT_LABELS = {"selective": "selective checkpointing", "full": "full activation checkpointing"}
_QUANT_LABELS = {"nf4": "NF4 4-bit base weights (QLoRA)", "int8": "int8 base weights"}
_ZERO_LABELS = {1: "ZeRO-1: optimizer states sharded", 2: "ZeRO-2: + gradients sharded", 3: "ZeRO-3 / FSDP: + weights sharded"}
_OFFLOAD_LABELS = {"optimizer": "optimizer offloaded to CPU", "optimizer+params": "optimizer and weights offloaded to CPU"}


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
        label = _PRECISION_LABELS[config.precision]
        if config.master_weights:
            label += " + fp32 master copy"
        rungs.append(_Rung("precision", label, ("precision", "master_weights")))
    if config.optimizer != "adamw":
        label = _OPTIMIZER_LABELS[config.optimizer]
        if config.optimizer == "galore-adamw":
            label += f" (rank {config.galore_rank})"
        rungs.append(_Rung("optimizer", label, ("optimizer",)))
    if config.optimizer_impl != "foreach":
        rungs.append(_Rung("optimizer_impl", _IMPL_LABELS[config.optimizer_impl], ("optimizer_impl",)))
    if config.lora_rank > 0:
        rungs.append(_Rung("lora_rank", f"LoRA rank {config.lora_rank} ({config.lora_targets})", ("lora_rank",)))
    if config.quant != "none":
        rungs.append(_Rung("quant", _QUANT_LABELS[config.quant], ("quant",)))
    if config.tp > 1:
        rungs.append(_Rung("tp", f"tensor parallel x{config.tp}", ("tp",)))
    if config.pp > 1:
        rungs.append(_Rung("pp", f"pipeline parallel, {config.pp} stages", ("pp",)))
    if config.zero > 0:
        label = _ZERO_LABELS[config.zero]
        if config.dp > 1:
            label += f" over {config.dp} ranks"
        rungs.append(_Rung("zero", label, ("zero",)))
    if config.offload != "none":
        rungs.append(_Rung("offload", _OFFLOAD_LABELS[config.offload], ("offload",)))
    if config.attention != "eager":
        rungs.append(_Rung("attention", "flash attention", ("attention",)))
    if config.checkpointing != "none":
        rungs.append(_Rung("checkpointing", _CHECKPOINT_LABELS[config.checkpointing], ("checkpointing",)))
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
