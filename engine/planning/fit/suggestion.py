"""suggest: the least invasive set of option changes that makes a config fit, with a margin."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig
from memtui.engine.model.validation import PAGED_OPTIMIZERS, adapts_head
from memtui.engine.errors import cli_flag
from memtui.engine.planning.fit.search import (
    DEFAULT_MARGIN,
    GPU_LIMIT,
    Evaluator,
    budget_json,
    config_json,
    smallest_fitting_ranks,
    with_changes,
)
from memtui.engine.units import format_gib




@dataclass(frozen=True)
class Step:
    """One thing to enable, the options it sets (flag -> (before, after)) and why it helps."""

    title: str
    reason: str
    changes: dict[str, tuple[Any, Any]]
    device_peak_bytes: int | None = None  # the estimate with this and every earlier step applied

    def as_json(self) -> dict:
        return {
            "title": self.title,
            "reason": self.reason,
            "changes": {flag: {"from": before, "to": after} for flag, (before, after) in self.changes.items()},
            "device_peak_bytes": self.device_peak_bytes,
        }


@dataclass(frozen=True)
class Plan:
    """A config that fits, reached from the user's by `steps`."""

    summary: str
    steps: list[Step]
    config: TrainingConfig
    budget: Budget
    changes_training: bool  # trains something different (adapters, quantized base, other optimizer numerics)
    more_hardware: bool  # more GPUs or CPU offload

    @property
    def flags(self) -> str:
        """The command-line flags that turn the user's config into this one."""
        parts: list[str] = []
        for step in self.steps:
            for flag, (_, after) in step.changes.items():
                parts.append(flag_text(flag, after))
        return " ".join(parts)

    def as_json(self) -> dict:
        return {
            "summary": self.summary,
            "flags": self.flags,
            "changes_training": self.changes_training,
            "more_hardware": self.more_hardware,
            "steps": [step.as_json() for step in self.steps],
            "config": config_json(self.config),
            "budget": budget_json(self.budget),
        }


@dataclass(frozen=True)
class Suggestion:
    """What to enable so the config fits: the least invasive plan, and plans that keep the training as is."""

    fits_already: bool
    plan: Plan | None  # None when fits_already or when nothing searched fits
    alternatives: list[Plan] = field(default_factory=list)
    budget: Budget | None = None  # the user's config as given
    message: str = ""
    estimates: int = 0

    @property
    def fits(self) -> bool:
        return self.fits_already or self.plan is not None

    def as_json(self) -> dict:
        return {
            "question": "suggest",
            "fits": self.fits,
            "fits_already": self.fits_already,
            "message": self.message,
            "plan": None if self.plan is None else self.plan.as_json(),
            "alternatives": [plan.as_json() for plan in self.alternatives],
            "device_peak_bytes": None if self.budget is None else self.budget.device_peak_bytes,
            "estimates": self.estimates,
        }


def flag_text(flag: str, value: Any) -> str:
    """How the command line sets `flag` to `value`: `--x 3`, or `--x` / `--no-x` for a switch."""
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


# A knob is one option the search may turn; its values go from the user's towards more savings.
@dataclass(frozen=True)
class _Knob:
    field: str
    values: tuple[Any, ...]
    costs: tuple[int, ...]
    monotone: bool = True  # each value needs no more memory than the one before (not true of precision)


@dataclass(frozen=True)
class _Mode:
    """What is trained, from the user's own setup to the most frugal: a rung of the ladder."""

    title: str
    reason: str
    changes: dict[str, Any]
    changes_training: bool


_REASONS = {
    "attention": "flash attention (SDPA) never stores the s x s score matrix; same math",
    "optimizer_impl": "fused AdamW updates in one kernel, without foreach's copy of a whole state; same results",
    "precision": "autocast computes in 16 bits and halves the saved activations; fp32 master weights stay",
    "checkpointing": "recompute activations during backward (about a third more compute); same results",
    "zero": "shard optimizer states, gradients (ZeRO-2) and weights (ZeRO-3) over the data-parallel GPUs you have",
    "optimizer_in_backward": "step each parameter in backward and free its gradient, so a full set of gradients "
                             "never exists (torchtune optimizer_in_bwd); no gradient accumulation or clipping",
    "activation_offload": "copy what the layers save for backward to pinned CPU memory and back when backward needs "
                          "it (torchtune OffloadActivations); same results, slower where the copies do not overlap",
    "lora_dtype": "adapters, their gradients and optimizer states in the compute dtype instead of peft's fp32, and "
                  "no fp32 copy of each adapted layer's input (as torchtune and LitGPT train them)",
}


def _mixed(gpu: GpuSpec) -> str:
    return "bf16-mixed" if gpu.bf16 else "16-mixed"


def _pure16(gpu: GpuSpec) -> str:
    return "bf16-true" if gpu.bf16 else "16-true"


def _compute_adapters_help(config: TrainingConfig) -> bool:
    """Whether --lora-dtype compute would shrink fp32 adapters: not where the compute dtype is fp32 (32-true, or
    autocast over fp32 weights, which the adapters follow), and not where memtui refuses it (16-mixed's GradScaler
    and fp16 gradients; an fp32 head after k-bit prep)."""
    if not config.uses_lora or config.lora_dtype != "fp32" or config.precision == "16-mixed":
        return False
    if config.kbit_prep and adapts_head(config):
        return False
    return with_changes(config, lora_dtype="compute").adapter_dtype != "fp32"


def _knobs(config: TrainingConfig, gpu: GpuSpec) -> list[_Knob]:
    """The options that change neither what is trained nor the hardware, in order of invasiveness."""
    knobs: list[_Knob] = []
    if config.attention == "eager":
        knobs.append(_Knob("attention", ("flash",), (1,)))
    if config.optimizer == "adamw" and config.optimizer_impl != "fused" and config.offload == "none":
        knobs.append(_Knob("optimizer_impl", ("fused",), (1,)))
    if config.precision == "32-true":
        knobs.append(_Knob("precision", (_mixed(gpu),), (2,), monotone=False))
    if config.dp > 1 and config.zero < 3:
        stages = tuple(range(config.zero + 1, 4))
        knobs.append(_Knob("zero", stages, tuple(stage - config.zero + 1 for stage in stages)))
    # Alone on one GPU only: beside the ZeRO knob, or a precision knob that may pick 16-mixed (a GradScaler), its
    # refused combinations would read as "saves the most and still does not fit" and prune the search.
    if (not config.optimizer_in_backward and config.dp == 1 and config.optimizer not in PAGED_OPTIMIZERS and config.zero == 0 and config.grad_accum == 1
            and not config.master_weights and config.optimizer != "galore-adamw" and config.precision != "16-mixed"
            and (gpu.bf16 or config.precision != "32-true")):
        knobs.append(_Knob("optimizer_in_backward", (True,), (2,)))
    # One GPU only, as it is modelled; not in the searches over more GPUs (ZeRO set), where it would be refused.
    if config.gpus == 1 and config.zero == 0 and not config.activation_offload:
        knobs.append(_Knob("activation_offload", (True,), (3,)))
    ladder = ("none", "selective", "full")
    if config.checkpointing != "full":
        # torchtitan's op-level policy sits between selective and full: full is what is left to suggest.
        current = "selective" if config.checkpointing == "selective-op" else config.checkpointing
        values = ladder[ladder.index(current) + 1:]
        knobs.append(_Knob("checkpointing", values, tuple(range(2, 2 + len(values)))))
    # Last: at a tie in cost (with selective checkpointing) it is tried first, as it costs no recompute.
    if _compute_adapters_help(config):
        knobs.append(_Knob("lora_dtype", ("compute",), (2,)))
    return knobs


def _modes(config: TrainingConfig, gpu: GpuSpec) -> list[_Mode]:
    """The training-mode ladder from config: as is, 8-bit AdamW, 16-bit weights, LoRA, QLoRA."""
    modes = [_Mode("as configured", "", {}, False)]
    # No paged-optimizer mode: bitsandbytes' paged states "fit" by migrating to CPU RAM whenever the step
    # needs the room, every step; fit proposes what fits resident. The ladder and the estimate still show them.
    lean_optimizer = {"optimizer": "adamw-8bit"} if config.optimizer == "adamw" and not config.uses_lora else {}
    if lean_optimizer:
        modes.append(_Mode(
            "8-bit AdamW", "bitsandbytes keeps both Adam moments in 8 bits (about 2 bytes/param instead of 8)",
            lean_optimizer, True,
        ))
    pure = _pure16(gpu)
    if config.precision != pure and config.quant == "none":
        changes = {"precision": pure, **lean_optimizer}
        if config.master_weights:
            changes["master_weights"] = False
        reason = ("weights, gradients and optimizer states in 16 bits, half of mixed precision's; "
                  "without fp32 master weights small updates can round away")
        if config.uses_lora:
            reason = "the frozen base in 16 bits instead of 32"
        modes.append(_Mode(f"{pure} weights", reason, changes, not config.uses_lora))
    # Adapters on a frozen base: no master weights, and GaLore's projection has nothing to project.
    adapters = {"master_weights": False} if config.master_weights else {}
    if config.optimizer == "galore-adamw":
        adapters["optimizer"] = "adamw"
    if not config.uses_lora:
        changes = {"lora_rank": 16, "lora_targets": "all-linear", "precision": pure, **adapters}
        modes.append(_Mode(
            "LoRA r=16", "freeze the base in 16 bits and train rank-16 adapters on every linear layer "
            "(under 1% of the parameters)", changes, True,
        ))
    if config.quant != "nf4":
        changes = {"quant": "nf4", "precision": _mixed(gpu)}
        if not config.uses_lora:
            changes.update(lora_rank=16, lora_targets="all-linear")
        changes.update(adapters)
        modes.append(_Mode(
            "QLoRA (nf4)", "store the frozen base in 4-bit NF4 (about 0.52 bytes per weight) and train "
            "rank-16 adapters in 16-bit compute", changes, True,
        ))
    return modes


def _combos(knobs: list[_Knob]) -> list[tuple[int, ...]]:
    """Every setting of the knobs as value indices (0 = as configured), cheapest first.

    Cheapest = the lowest total cost, then the fewest changes.
    """
    ranges = [range(len(knob.values) + 1) for knob in knobs]

    def order(picks: tuple[int, ...]) -> tuple[int, int]:
        cost = sum(knob.costs[pick - 1] for knob, pick in zip(knobs, picks) if pick)
        return cost, sum(1 for pick in picks if pick)

    return sorted(itertools.product(*ranges), key=order)


def _changes(knobs: list[_Knob], picks: tuple[int, ...]) -> dict[str, Any]:
    return {knob.field: knob.values[pick - 1] for knob, pick in zip(knobs, picks) if pick}


def _upper_bounds(knobs: list[_Knob]) -> list[tuple[int, ...]]:
    """The settings that save the most: monotone knobs at their last value, the others each way."""
    ranges = [(len(knob.values),) if knob.monotone else range(len(knob.values) + 1) for knob in knobs]
    return list(itertools.product(*ranges))


def _dominated(knobs: list[_Knob], picks: tuple[int, ...], failed: tuple[int, ...]) -> bool:
    """True when `failed` saves at least as much as `picks` on every knob, so picks cannot fit either."""
    return all(
        pick <= other if knob.monotone else pick == other for knob, pick, other in zip(knobs, picks, failed)
    )


def _cheapest_fitting(evaluator: Evaluator, base: TrainingConfig, knobs: list[_Knob]) -> TrainingConfig | None:
    failed: list[tuple[int, ...]] = []
    for bound in _upper_bounds(knobs):
        if not evaluator.fits(with_changes(base, **_changes(knobs, bound))):
            failed.append(bound)
    if len(failed) == len(_upper_bounds(knobs)):
        return None
    for picks in _combos(knobs):
        if any(_dominated(knobs, picks, other) for other in failed):
            continue
        candidate = with_changes(base, **_changes(knobs, picks))
        if evaluator.fits(candidate):
            return candidate
        failed.append(picks)
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fit_in_mode(evaluator: Evaluator, base: TrainingConfig, knobs: list[_Knob]) -> TrainingConfig | None:
    """The cheapest knob setting that fits base; failing that, at the largest micro-batch dividing base's."""
    bounds = [with_changes(base, **_changes(knobs, bound)) for bound in _upper_bounds(knobs)]
    if base.batch_size > 1 and not any(evaluator.fits(with_changes(bound, batch_size=1)) for bound in bounds):
        return None  # not even one sequence at a time: skip the rung in a couple of estimates
    found = _cheapest_fitting(evaluator, base, knobs)
    if found is not None or base.batch_size == 1:
        return found
    # Gradient accumulation: micro-batch m, batch / m steps per update, the same effective batch.
    candidates = _divisors(base.batch_size)[:-1]
    low, high = 0, len(candidates) - 1  # candidates[0] == 1 fits for some bound; find the largest that does
    while low < high:
        middle = (low + high + 1) // 2
        if any(evaluator.fits(with_changes(bound, batch_size=candidates[middle])) for bound in bounds):
            low = middle
        else:
            high = middle - 1
    return _cheapest_fitting(evaluator, with_changes(base, batch_size=candidates[low]), knobs)


def _min_ranks_in_mode(
    evaluator: Evaluator, base: TrainingConfig, knobs: list[_Knob], lowest: int, highest: int
) -> tuple[int, TrainingConfig] | None:
    """Fewest data-parallel ranks in lowest..highest at which some knob setting fits base (ZeRO-3).

    Ranks are counted at micro-batch 1 (gradient accumulation keeps the batch),
    then the micro-batch is made as large as those ranks allow.
    """
    group = base.tp * base.pp
    best: int | None = None
    for bound in _upper_bounds(knobs):
        config = with_changes(base, batch_size=1, **_changes(knobs, bound))
        top = highest if best is None else best - 1
        if top < lowest:
            break
        ranks = smallest_fitting_ranks(lambda n: evaluator.peak(with_changes(config, gpus=n * group)), evaluator.memory, lowest, top)
        if ranks is not None:
            best = ranks
    if best is None:
        return None
    found = _fit_in_mode(evaluator, with_changes(base, gpus=best * group), knobs)
    return (best, found) if found is not None else None


def _steps(
    evaluator: Evaluator, original: TrainingConfig, final: TrainingConfig, mode: _Mode, hardware: dict[str, Any],
    hardware_title: str, hardware_reason: str,
) -> list[Step]:
    """The changes from original to final, grouped into steps in the order they are applied."""
    groups: list[tuple[str, str, dict[str, Any]]] = []
    if mode.changes:
        groups.append((mode.title, mode.reason, dict(mode.changes)))
    if hardware:  # before the knobs: what sharding leaves is what checkpointing and the rest act on
        groups.append((hardware_title, hardware_reason, dict(hardware)))
    for name in ("attention", "optimizer_impl", "precision", "lora_dtype", "zero", "optimizer_in_backward",
                 "checkpointing", "activation_offload"):
        value = getattr(final, name)
        if value != getattr(original, name) and name not in mode.changes and name not in hardware:
            title = {"attention": "flash attention", "optimizer_impl": "fused AdamW", "precision": f"{value} autocast",
                     "lora_dtype": f"LoRA adapters in {final.adapter_dtype}",
                     "zero": f"ZeRO-{value}", "optimizer_in_backward": "optimizer step in backward",
                     "checkpointing": f"{value} activation checkpointing",
                     "activation_offload": "activation offloading to CPU"}[name]
            groups.append((title, _REASONS[name], {name: value}))
    if final.batch_size != original.batch_size:
        accumulation = original.batch_size // final.batch_size
        groups.append((
            f"micro-batch {final.batch_size}, accumulate {accumulation}",
            f"{accumulation} micro-batches of {final.batch_size} per optimizer step: the same effective batch "
            f"of {original.batch_size}, fewer activations at once",
            {"batch_size": final.batch_size},
        ))
    steps: list[Step] = []
    current = original
    for title, reason, changes in groups:
        delta = {cli_flag(name): (getattr(original, name), value) for name, value in changes.items()
                 if getattr(original, name) != value}
        current = with_changes(current, **changes)
        budget = evaluator.budget(current)
        if delta:
            steps.append(Step(title, reason, delta, None if budget is None else budget.device_peak_bytes))
    return steps


def _plan(
    evaluator: Evaluator, original: TrainingConfig, final: TrainingConfig, mode: _Mode,
    hardware: dict[str, Any] | None = None, hardware_title: str = "", hardware_reason: str = "",
) -> Plan:
    hardware = hardware or {}
    steps = _steps(evaluator, original, final, mode, hardware, hardware_title, hardware_reason)
    budget = evaluator.budget(final)
    assert budget is not None and budget.device_required_bytes <= evaluator.memory  # every plan was estimated to fit
    summary = " + ".join(step.title for step in steps) or "as configured"
    return Plan(summary, steps, final, budget, mode.changes_training, bool(hardware))


def suggest(
    config: TrainingConfig, *, model: ModelSpec | None = None, gpu: GpuSpec | None = None,
    margin: float = DEFAULT_MARGIN,
) -> Suggestion:
    """The least invasive set of option changes that makes config fit, with a reason per step.

    A plan's device peak stays under (1 - margin) of the card: a plan at 98% of it
    would fail on the first allocator hiccup. A config that fits as given is left
    alone, margin or not.

    The ladder, least invasive first; the first rung with a fitting config wins:
      1. on the GPUs given, training exactly as configured: flash attention,
         fused AdamW, 16-bit autocast (from 32-true), LoRA adapters in the
         compute dtype (from peft's fp32, where that is 16-bit), ZeRO over the data-parallel
         GPUs already there, selective then full checkpointing; if no setting
         fits the micro-batch, the largest micro-batch dividing it that fits
         (with gradient accumulation: the same effective batch);
      2. the same, with 8-bit AdamW; then pure 16-bit weights;
      3. LoRA r=16 on a 16-bit base; then QLoRA (NF4 base);
      4. more hardware: optimizer states offloaded to CPU RAM on the same GPUs;
         then ZeRO-3 over the fewest GPUs any training mode needs (ties go to
         the least invasive mode).
    Within a rung, option costs add up (flash = fused = 1, autocast = compute-dtype adapters = selective = 2,
    full checkpointing = 3, ZeRO-n = n - current + 1) and the cheapest fitting setting
    wins. So the plan is minimal: undoing any one step, or stopping at an earlier
    rung, does not fit. When the plan changes what is trained, `alternatives`
    gives the least hardware that fits while training as configured.
    """
    if not 0.0 <= margin < 1.0:
        raise InputError("--margin", f"{margin * 100:g} is not a percentage of the card to leave free", "0 to under 100")
    evaluator = Evaluator(config, model, gpu, margin)
    original = evaluator.strict_budget(config)
    if original.fits:
        message = f"fits as configured: peak {format_gib(original.device_peak_bytes)} of {format_gib(evaluator.memory)}"
        return Suggestion(True, None, [], original, message, evaluator.estimates)

    modes = _modes(config, evaluator.gpu)

    def in_mode(mode: _Mode, base: TrainingConfig) -> TrainingConfig:
        return with_changes(base, **mode.changes)

    plan: Plan | None = None
    # Rungs 1-3: the GPUs given.
    for mode in modes:
        base = in_mode(mode, config)
        found = _fit_in_mode(evaluator, base, _knobs(base, evaluator.gpu))
        if found is not None:
            plan = _plan(evaluator, config, found, mode)
            break

    alternatives: list[Plan] = []
    if plan is None or plan.changes_training:
        # With a plan in hand, only hardware that keeps the training as configured is worth searching.
        searched = modes if plan is None else [mode for mode in modes if not mode.changes_training]
        hardware_plans = _hardware_plans(evaluator, config, searched, first_only=plan is not None)
        if plan is None and hardware_plans:
            plan = hardware_plans[0]
        alternatives = [alt for alt in hardware_plans if not alt.changes_training and alt is not plan][:1]

    memory = format_gib(evaluator.gpu.memory_bytes)
    if plan is None:
        message = (
            f"nothing fits: not with QLoRA and full checkpointing, nor on up to {GPU_LIMIT:,} GPUs "
            f"({format_gib(original.device_peak_bytes)} of {memory} as configured)"
        )
        if evaluator.model.family == "generic":
            # Each option set of a generic model is a trace of its own: only those traced already were tried.
            message = (f"nothing fits among the option sets traced so far for this generic model, on one GPU "
                       f"({format_gib(original.device_peak_bytes)} of {memory} as configured); `memtui estimate` "
                       "with other options (--checkpointing full, --lora-rank) traces them, then fit tries them too")
        return Suggestion(False, None, [], original, message, evaluator.estimates)
    message = (
        f"{plan.summary}: peak {format_gib(plan.budget.device_peak_bytes)} of {memory} "
        f"(was {format_gib(original.device_peak_bytes)}" + (f"; leaves at least {margin * 100:g}% free)" if margin else ")")
    )
    if plan.budget.paged_bytes:  # the margin is left beside what must be on the card; paged states fill the rest
        message = (
            f"{plan.summary}: peak {format_gib(plan.budget.device_required_bytes)} of {memory} without the "
            f"{format_gib(plan.budget.paged_bytes)} of paged optimizer states "
            f"({format_gib(plan.budget.paged_evicted_bytes)} of them paged out to host memory; was "
            f"{format_gib(original.device_peak_bytes)}" + (f"; leaves at least {margin * 100:g}% free)" if margin else ")"))
    return Suggestion(False, plan, alternatives, original, message, evaluator.estimates)


def _hardware_plans(
    evaluator: Evaluator, config: TrainingConfig, modes: list[_Mode], *, first_only: bool
) -> list[Plan]:
    """Plans that add hardware, least first: CPU offload on the same GPUs, then ZeRO-3 on more.

    The first fitting plan of each kind is kept, plus the least hardware that
    trains as configured (for `alternatives`); first_only stops at the first plan.
    """
    plans: list[Plan] = []
    gpu = evaluator.gpu
    # CPU offload (ZeRO-Offload): optimizer states and the step in CPU RAM, GPUs unchanged.
    if config.offload == "none":
        hardware = {"offload": "optimizer", "zero": max(config.zero, 2)}
        reason = "ZeRO-Offload keeps optimizer states in CPU RAM and runs the step on the CPU (slower; needs host memory)"
        for mode in modes:
            base = with_changes(with_changes(config, **mode.changes), **hardware)
            found = _fit_in_mode(evaluator, base, _knobs(base, gpu))
            if found is not None:
                plans.append(_plan(evaluator, config, found, mode, hardware, "optimizer offload to CPU", reason))
                break
        if plans and (first_only or not plans[0].changes_training):
            return plans
        if plans:  # offload fits by changing the training: look for more GPUs that keep it
            modes = [mode for mode in modes if not mode.changes_training]
    # ZeRO-3 over more data-parallel GPUs: the fewest GPUs any mode needs, the least invasive mode on ties.
    group = config.tp * config.pp
    lowest = config.dp + 1
    highest = max(GPU_LIMIT // group, 1)
    if config.offload == "none" and lowest <= highest:
        best: tuple[int, _Mode, TrainingConfig] | None = None
        full_training: tuple[int, _Mode, TrainingConfig] | None = None
        for mode in reversed(modes):  # most frugal first: it bounds the search for the others
            base = with_changes(with_changes(config, **mode.changes), zero=3)
            top = highest if best is None else best[0]
            if not mode.changes_training and full_training is None:
                top = highest  # trains as configured: worth knowing even when it needs more GPUs
            result = _min_ranks_in_mode(evaluator, base, _knobs(base, gpu), lowest, top)
            if result is None:
                continue
            ranks, found = result
            if best is None or ranks <= best[0]:
                best = (ranks, mode, found)
            if not mode.changes_training:
                full_training = (ranks, mode, found)
        reason_for = lambda gpus: f"shard weights, gradients and optimizer states over {gpus} GPUs (ZeRO-3 / FSDP)"  # noqa: E731
        for choice in (best, full_training):
            if choice is None:
                continue
            ranks, mode, found = choice
            gpus = ranks * group
            hardware = {"zero": 3, "gpus": gpus}
            plan = _plan(evaluator, config, found, mode, hardware, f"ZeRO-3 over {gpus} GPUs", reason_for(gpus))
            if all(plan.config != other.config for other in plans):
                plans.append(plan)
    # Offload first (same GPUs), then more GPUs; a plan that trains as configured after them.
    plans.sort(key=lambda plan: (plan.config.gpus, plan.changes_training))
    return plans
