"""The planner's questions, answered with the estimator: what is the most that fits, and what makes it fit.

- max_batch_size: the largest micro-batch per data-parallel rank that fits;
- max_seq_len: the longest sequence that fits (within the model's position limits);
- min_gpus: the fewest GPUs (data-parallel ranks, tp and pp kept) for a ZeRO stage;
- suggest: the least invasive set of option changes that makes a config fit.

"Fits" is Budget.fits: the device peak (what NVML would show) is within the
GPU's memory; suggest aims lower, leaving a margin (DEFAULT_MARGIN, 5%) for
what no estimate sees (fragmentation, another process, a driver update). Every answer is checked by an estimate at the answer and, where
there is one, at the next value up (or down), so the boundary is exact under
the estimator. The searches bracket the boundary and interpolate between the
two ends (memory is close to linear in the batch and the sequence, and in
1 / data-parallel ranks), falling back to bisection when interpolation stalls,
so a question costs a handful of estimates rather than a scan.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig
from memtui.engine.units import format_gib
from memtui.engine.model.validation import flag_name

__all__ = [
    "BATCH_LIMIT",
    "DEFAULT_MARGIN",
    "GPU_LIMIT",
    "SEQ_LIMIT",
    "FitReport",
    "MaxBatchResult",
    "MaxSeqResult",
    "MinGpusResult",
    "Plan",
    "Step",
    "Suggestion",
    "fit_report",
    "max_batch_size",
    "max_seq_len",
    "min_gpus",
    "suggest",
]

BATCH_LIMIT = 65_536  # TrainingConfig's own bound on --batch-size
SEQ_LIMIT = 1_048_576  # search cap for models whose positions extrapolate (RoPE)
GPU_LIMIT = 16_384  # search cap for --min-gpus and suggest's "more GPUs"
DEFAULT_MARGIN = 0.05  # the share of the card suggest leaves free

_INFINITE = float("inf")


# ---------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------


class _Evaluator:
    """estimate() with the model and GPU resolved once and every answer memoised.

    Resolving a preset costs about as much as the estimate itself, and the
    searches revisit configs (the bracket's ends, suggest's shared rungs).
    A config the validator rejects counts as not fitting; with a margin, fitting
    means a device peak within (1 - margin) of the card.
    """

    def __init__(self, config: TrainingConfig, model: ModelSpec | None, gpu: GpuSpec | None, margin: float = 0.0) -> None:
        self.model = model or resolve_model(config.model)
        self.gpu = gpu or resolve_gpu(config.gpu)
        self.memory = int(self.gpu.memory_bytes * (1.0 - margin))  # the target every search aims under
        self._cache: dict[TrainingConfig, Budget | None] = {}
        self.estimates = 0

    def budget(self, config: TrainingConfig) -> Budget | None:
        try:
            return self._cache[config]
        except KeyError:
            pass
        try:
            result: Budget | None = estimate(config, model=self.model, gpu=self.gpu)
        except InputError:
            result = None
        self.estimates += 1
        self._cache[config] = result
        return result

    def strict_budget(self, config: TrainingConfig) -> Budget:
        """For the user's own config: invalid input is raised, not skipped."""
        result = estimate(config, model=self.model, gpu=self.gpu)
        self._cache[config] = result
        self.estimates += 1
        return result

    def peak(self, config: TrainingConfig) -> float:
        budget = self.budget(config)
        return _INFINITE if budget is None else budget.device_peak_bytes

    def fits(self, config: TrainingConfig) -> bool:
        budget = self.budget(config)
        return budget is not None and budget.device_peak_bytes <= self.memory


def _boundary(
    peak: Callable[[int], float],
    target: int,
    good: int,
    bad: int,
    good_peak: float,
    bad_peak: float,
    coordinate: Callable[[float], float] = float,
    inverse: Callable[[float], float] = float,
) -> int:
    """The fitting integer next to the boundary between `good` (fits) and `bad` (does not).

    good < bad when memory grows with n (batch, sequence), good > bad when it
    shrinks (data-parallel ranks). Regula falsi on the peak, linear in
    `coordinate(n)`, with the Illinois rule (an end kept twice has its excess
    halved) so curved peaks (eager attention's s^2) converge fast too; after
    a dozen probes it bisects, so it can never crawl.
    """
    toward_bad = 1 if bad > good else -1
    good_excess, bad_excess = good_peak - target, bad_peak - target  # <= 0 and > 0
    kept = None
    probes = 0
    while abs(bad - good) > 1:
        probes += 1
        if probes > 12 or bad_excess == _INFINITE or bad_excess <= good_excess:
            probe = (good + bad) // 2
        else:
            cg, cb = coordinate(good), coordinate(bad)
            guess = inverse(cg - good_excess * (cb - cg) / (bad_excess - good_excess))
            probe = math.floor(guess) if toward_bad > 0 else math.ceil(guess)
        probe = min(max(probe, min(good, bad) + 1), max(good, bad) - 1)
        excess = peak(probe) - target
        if excess <= 0:
            good, good_excess = probe, excess
            if kept == "bad":
                bad_excess /= 2
            kept = "bad"
        else:
            bad, bad_excess = probe, excess
            if kept == "good":
                good_excess /= 2
            kept = "good"
    return good


def _largest_fitting(peak: Callable[[int], float], target: int, upper: int) -> tuple[int, bool]:
    """(largest n in 1..upper with peak(n) <= target, whether upper itself fits); 0 when 1 does not fit.

    Assumes the peak does not decrease as n grows. Gallops up by the secant's
    prediction, at most 8x a step (the first points are dominated by fixed
    costs and 512-byte rounding, so their slope is a poor guide), then closes in.
    """
    good_peak = peak(1)
    if good_peak > target:
        return 0, False
    good, probe = 1, 2
    previous: tuple[int, float] | None = None
    while probe <= upper:
        value = peak(probe)
        if value > target:
            return _boundary(peak, target, good, probe, good_peak, value), False
        if probe == upper:
            return upper, True
        previous, (good, good_peak) = (good, good_peak), (probe, value)
        slope = (good_peak - previous[1]) / (good - previous[0])
        guess = good + (target - good_peak) / slope + 1 if slope > 0 else _INFINITE
        probe = int(min(max(guess, good + 1), 8 * good, upper))
    return good, good == upper


def _smallest_fitting_ranks(peak: Callable[[int], float], target: int, lowest: int, highest: int) -> int | None:
    """Smallest data-parallel degree in lowest..highest that fits, assuming the peak shrinks with it."""
    lowest_peak = peak(lowest)
    if lowest_peak <= target:
        return lowest
    if highest <= lowest:
        return None
    highest_peak = peak(highest)
    if highest_peak > target:
        return None
    # Sharded states go as 1/dp: the peak is close to linear in 1/dp.
    return _boundary(
        peak, target, highest, lowest, highest_peak, lowest_peak,
        coordinate=lambda n: 1.0 / n, inverse=lambda u: 1.0 / u if u > 0 else _INFINITE,
    )


def _with(config: TrainingConfig, **changes: Any) -> TrainingConfig:
    """A copy with fields changed; values come from the option tuples, so no re-validation is needed."""
    return config.model_copy(update=changes)


def _budget_json(budget: Budget | None) -> dict | None:
    return None if budget is None else budget.model_dump(mode="json")


def _config_json(config: TrainingConfig | None) -> dict | None:
    return None if config is None else config.model_dump(mode="json")


# ---------------------------------------------------------------------------
# max batch size
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MaxBatchResult:
    """The largest micro-batch per data-parallel rank that fits; 0 when even 1 does not."""

    batch_size: int
    at_least: bool  # the search cap fits too: the true maximum is this or more
    limit: int
    budget: Budget | None  # at batch_size (None when nothing fits)
    over_budget: Budget | None  # at batch_size + 1, or at 1 when nothing fits: why it stops
    message: str
    estimates: int

    @property
    def fits(self) -> bool:
        return self.batch_size > 0

    def as_json(self) -> dict:
        return {
            "question": "max_batch",
            "batch_size": self.batch_size,
            "fits": self.fits,
            "at_least": self.at_least,
            "limit": self.limit,
            "message": self.message,
            "budget": _budget_json(self.budget),
            "next_device_peak_bytes": None if self.over_budget is None else self.over_budget.device_peak_bytes,
            "estimates": self.estimates,
        }


def max_batch_size(
    config: TrainingConfig, *, model: ModelSpec | None = None, gpu: GpuSpec | None = None, limit: int = BATCH_LIMIT
) -> MaxBatchResult:
    """Largest micro-batch (per data-parallel rank) at config's sequence length that fits."""
    evaluator = _Evaluator(config, model, gpu)
    evaluator.strict_budget(config)
    return _max_batch(evaluator, config, limit)


def _max_batch(evaluator: _Evaluator, config: TrainingConfig, limit: int) -> MaxBatchResult:
    limit = max(1, min(limit, BATCH_LIMIT))

    def peak(batch: int) -> float:
        return evaluator.peak(_with(config, batch_size=batch))

    batch, at_cap = _largest_fitting(peak, evaluator.memory, limit)
    memory = format_gib(evaluator.memory)
    if batch == 0:
        over = evaluator.budget(_with(config, batch_size=1))
        message = (
            f"nothing fits: batch 1 x {config.seq_len} tokens needs {format_gib(over.device_peak_bytes)} "
            f"of {memory}" if over else "nothing fits"
        )
        return MaxBatchResult(0, False, limit, None, over, message, evaluator.estimates)
    budget = evaluator.budget(_with(config, batch_size=batch))
    if at_cap:
        message = f"at least {batch} (the search stops at {limit}); peak {format_gib(budget.device_peak_bytes)} of {memory}"
        return MaxBatchResult(batch, True, limit, budget, None, message, evaluator.estimates)
    over = evaluator.budget(_with(config, batch_size=batch + 1))
    message = (
        f"{batch} x {config.seq_len} tokens = {batch * config.seq_len:,} tokens per rank; "
        f"peak {format_gib(budget.device_peak_bytes)} of {memory}"
        + (f" (batch {batch + 1} needs {format_gib(over.device_peak_bytes)})" if over else "")
    )
    return MaxBatchResult(batch, False, limit, budget, over, message, evaluator.estimates)


# ---------------------------------------------------------------------------
# max sequence length
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MaxSeqResult:
    """The longest sequence that fits at config's micro-batch; 0 when nothing does."""

    seq_len: int
    multiple_of: int
    at_least: bool  # the search cap itself fits: longer may fit too
    limit: int
    limit_reason: str  # why the search stops where it does
    limited_by: str  # "memory", "model" (learned positions) or "search" (the cap; see at_least)
    beyond_trained: bool  # longer than the model's max_position_embeddings (RoPE extrapolation)
    budget: Budget | None
    over_budget: Budget | None
    message: str
    estimates: int

    @property
    def fits(self) -> bool:
        return self.seq_len > 0

    def as_json(self) -> dict:
        return {
            "question": "max_seq",
            "seq_len": self.seq_len,
            "fits": self.fits,
            "multiple_of": self.multiple_of,
            "at_least": self.at_least,
            "limit": self.limit,
            "limit_reason": self.limit_reason,
            "limited_by": self.limited_by,
            "beyond_trained": self.beyond_trained,
            "message": self.message,
            "budget": _budget_json(self.budget),
            "next_device_peak_bytes": None if self.over_budget is None else self.over_budget.device_peak_bytes,
            "estimates": self.estimates,
        }


def max_seq_len(
    config: TrainingConfig,
    *,
    model: ModelSpec | None = None,
    gpu: GpuSpec | None = None,
    multiple_of: int = 1,
    limit: int | None = None,
) -> MaxSeqResult:
    """Longest sequence (a multiple of `multiple_of`) at config's micro-batch that fits.

    Models with learned positions stop at max_position_embeddings; RoPE models
    may go past their trained length (the result says so) up to SEQ_LIMIT.
    """
    if multiple_of < 1:
        raise InputError("--seq-multiple", f"must be at least 1, got {multiple_of}", "1, 2, ... (e.g. 128, 256)")
    evaluator = _Evaluator(config, model, gpu)
    spec = evaluator.model
    # The user's own length may be what is wrong (GPT-2 past 1024); check the rest at a safe length.
    evaluator.strict_budget(_with(config, seq_len=min(config.seq_len, spec.max_position_embeddings)))
    return _max_seq(evaluator, config, multiple_of, limit)


def _max_seq(evaluator: _Evaluator, config: TrainingConfig, multiple_of: int, limit: int | None) -> MaxSeqResult:
    spec = evaluator.model
    if spec.positions == "learned":
        cap, reason, cap_kind = (spec.max_position_embeddings,
                                 f"{spec.id}'s {spec.max_position_embeddings} learned positions", "model")
    else:
        cap, reason, cap_kind = SEQ_LIMIT, f"the search cap of {SEQ_LIMIT:,} tokens", "search"
    if limit is not None and limit < cap:
        cap, reason, cap_kind = limit, f"the limit of {limit:,} tokens", "search"
    steps = cap // multiple_of
    if steps < 1:
        raise InputError("--seq-multiple", f"{multiple_of} is longer than the {cap:,}-token limit", f"1..{cap}")

    def peak(step: int) -> float:
        return evaluator.peak(_with(config, seq_len=step * multiple_of))

    step, at_cap = _largest_fitting(peak, evaluator.memory, steps)
    memory = format_gib(evaluator.memory)
    if step == 0:
        over = evaluator.budget(_with(config, seq_len=multiple_of))
        message = (
            f"nothing fits: batch {config.batch_size} x {multiple_of} tokens needs "
            f"{format_gib(over.device_peak_bytes)} of {memory}" if over else "nothing fits"
        )
        return MaxSeqResult(0, multiple_of, False, cap, reason, "memory", False, None, over, message, evaluator.estimates)
    seq = step * multiple_of
    budget = evaluator.budget(_with(config, seq_len=seq))
    beyond = seq > spec.max_position_embeddings
    limited_by = cap_kind if at_cap else "memory"
    over = None if at_cap else evaluator.budget(_with(config, seq_len=seq + multiple_of))
    parts = [f"{seq:,} tokens x batch {config.batch_size}; peak {format_gib(budget.device_peak_bytes)} of {memory}"]
    if at_cap:
        parts.append(f"{'at least: ' if cap_kind == 'search' else ''}stops at {reason}")
    if beyond:
        parts.append(f"beyond the {spec.max_position_embeddings:,} trained positions (needs RoPE scaling to train well)")
    return MaxSeqResult(seq, multiple_of, at_cap and cap_kind == "search", cap, reason, limited_by, beyond, budget, over,
                        "; ".join(parts), evaluator.estimates)


# ---------------------------------------------------------------------------
# min GPUs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MinGpusResult:
    """The fewest GPUs for a ZeRO stage, tp and pp kept; gpus is None when no count up to the limit fits."""

    gpus: int | None
    data_parallel: int | None
    zero: int
    limit: int
    budget: Budget | None  # at the answer, or at the limit when nothing fits
    message: str
    estimates: int

    @property
    def fits(self) -> bool:
        return self.gpus is not None

    def as_json(self) -> dict:
        return {
            "question": "min_gpus",
            "gpus": self.gpus,
            "fits": self.fits,
            "data_parallel": self.data_parallel,
            "zero": self.zero,
            "limit": self.limit,
            "message": self.message,
            "budget": _budget_json(self.budget),
            "estimates": self.estimates,
        }


def default_zero_for_gpus(config: TrainingConfig) -> int:
    """The stage min_gpus assumes when none is given: the config's own, or ZeRO-3 when it has none."""
    return config.zero if config.zero > 0 else 3


def min_gpus(
    config: TrainingConfig,
    *,
    zero: int | None = None,
    model: ModelSpec | None = None,
    gpu: GpuSpec | None = None,
    limit: int = GPU_LIMIT,
) -> MinGpusResult:
    """Fewest total GPUs (more data-parallel ranks; tp, pp, batch and options kept) that fit at `zero`."""
    zero = default_zero_for_gpus(config) if zero is None else zero
    if zero not in (0, 1, 2, 3):
        raise InputError("--zero-for-gpus", f"{zero} is not a ZeRO stage", "0, 1, 2, 3")
    if config.offload == "optimizer+params" and zero != 3:
        raise InputError("--zero-for-gpus", f"--offload optimizer+params needs ZeRO-3, not {zero}", "3")
    if config.offload != "none" and zero == 0:
        raise InputError("--zero-for-gpus", "offloading runs through ZeRO", "1, 2, 3")
    evaluator = _Evaluator(config, model, gpu)
    evaluator.strict_budget(config)
    return _min_gpus(evaluator, _with(config, zero=zero), limit)


def _min_gpus(evaluator: _Evaluator, config: TrainingConfig, limit: int) -> MinGpusResult:
    zero = config.zero
    group = config.tp * config.pp
    highest = max(1, min(limit, BATCH_LIMIT) // group)
    limit_gpus = highest * group

    def at(ranks: int) -> TrainingConfig:
        return _with(config, gpus=ranks * group)

    ranks = _smallest_fitting_ranks(lambda n: evaluator.peak(at(n)), evaluator.memory, 1, highest if zero else 1)
    memory = format_gib(evaluator.memory)
    if ranks is not None:
        budget = evaluator.budget(at(ranks))
        gpus = ranks * group
        layout = f" ({ranks} data-parallel x tp {config.tp} x pp {config.pp})" if group > 1 else ""
        how = f"with ZeRO-{zero}" if ranks > 1 else "(no data parallelism needed)"
        message = f"{gpus} x {evaluator.gpu.id}{layout} {how}; peak {format_gib(budget.device_peak_bytes)} of {memory} per GPU"
        if ranks > 1:
            fewer = evaluator.budget(at(ranks - 1))
            if fewer is not None:
                message += f" ({(ranks - 1) * group} would need {format_gib(fewer.device_peak_bytes)})"
        return MinGpusResult(gpus, ranks, zero, limit_gpus, budget, message, evaluator.estimates)
    if zero == 0:
        budget = evaluator.budget(at(1))
        message = (
            "no GPU count fits with ZeRO-0: every data-parallel rank holds all weights, gradients and optimizer "
            f"states ({format_gib(budget.device_peak_bytes) if budget else '?'} per GPU), so more GPUs never help; "
            "try --zero-for-gpus 3"
        )
        return MinGpusResult(None, None, 0, group, budget, message, evaluator.estimates)
    budget = evaluator.budget(at(highest))
    floor = format_gib(budget.device_peak_bytes) if budget else "?"
    unsharded = {1: "weights and gradients are", 2: "weights are", 3: "activations and gathered layers are"}[zero]
    message = (
        f"even {limit_gpus:,} GPUs do not fit with ZeRO-{zero}: {floor} per GPU of {memory}; "
        f"its {unsharded} not sharded"
        + ("; try --zero-for-gpus 3" if zero < 3 else "; reduce the batch or sequence, or checkpoint activations")
    )
    return MinGpusResult(None, None, zero, limit_gpus, budget, message, evaluator.estimates)


# ---------------------------------------------------------------------------
# suggest
# ---------------------------------------------------------------------------


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
                parts.append(_flag_text(flag, after))
        return " ".join(parts)

    def as_json(self) -> dict:
        return {
            "summary": self.summary,
            "flags": self.flags,
            "changes_training": self.changes_training,
            "more_hardware": self.more_hardware,
            "steps": [step.as_json() for step in self.steps],
            "config": _config_json(self.config),
            "budget": _budget_json(self.budget),
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


def _flag_text(flag: str, value: Any) -> str:
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
}


def _mixed(gpu: GpuSpec) -> str:
    return "bf16-mixed" if gpu.bf16 else "16-mixed"


def _pure16(gpu: GpuSpec) -> str:
    return "bf16-true" if gpu.bf16 else "16-true"


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
    ladder = ("none", "selective", "full")
    if config.checkpointing != "full":
        values = ladder[ladder.index(config.checkpointing) + 1:]
        knobs.append(_Knob("checkpointing", values, tuple(range(2, 2 + len(values)))))
    return knobs


def _modes(config: TrainingConfig, gpu: GpuSpec) -> list[_Mode]:
    """The training-mode ladder from config: as is, 8-bit AdamW, 16-bit weights, LoRA, QLoRA."""
    modes = [_Mode("as configured", "", {}, False)]
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
    if not config.uses_lora:
        changes = {"lora_rank": 16, "lora_targets": "all-linear", "precision": pure}
        if config.master_weights:
            changes["master_weights"] = False
        if config.optimizer == "galore-adamw":
            changes["optimizer"] = "adamw"
        modes.append(_Mode(
            "LoRA r=16", "freeze the base in 16 bits and train rank-16 adapters on every linear layer "
            "(under 1% of the parameters)", changes, True,
        ))
    if config.quant != "nf4":
        changes = {"quant": "nf4", "precision": _mixed(gpu)}
        if not config.uses_lora:
            changes.update(lora_rank=16, lora_targets="all-linear")
        if config.master_weights:
            changes["master_weights"] = False
        if config.optimizer == "galore-adamw":
            changes["optimizer"] = "adamw"
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


def _cheapest_fitting(evaluator: _Evaluator, base: TrainingConfig, knobs: list[_Knob]) -> TrainingConfig | None:
    failed: list[tuple[int, ...]] = []
    for bound in _upper_bounds(knobs):
        if not evaluator.fits(_with(base, **_changes(knobs, bound))):
            failed.append(bound)
    if len(failed) == len(_upper_bounds(knobs)):
        return None
    for picks in _combos(knobs):
        if any(_dominated(knobs, picks, other) for other in failed):
            continue
        candidate = _with(base, **_changes(knobs, picks))
        if evaluator.fits(candidate):
            return candidate
        failed.append(picks)
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fit_in_mode(evaluator: _Evaluator, base: TrainingConfig, knobs: list[_Knob]) -> TrainingConfig | None:
    """The cheapest knob setting that fits base; failing that, at the largest micro-batch dividing base's."""
    bounds = [_with(base, **_changes(knobs, bound)) for bound in _upper_bounds(knobs)]
    if base.batch_size > 1 and not any(evaluator.fits(_with(bound, batch_size=1)) for bound in bounds):
        return None  # not even one sequence at a time: skip the rung in a couple of estimates
    found = _cheapest_fitting(evaluator, base, knobs)
    if found is not None or base.batch_size == 1:
        return found
    # Gradient accumulation: micro-batch m, batch / m steps per update, the same effective batch.
    candidates = _divisors(base.batch_size)[:-1]
    low, high = 0, len(candidates) - 1  # candidates[0] == 1 fits for some bound; find the largest that does
    while low < high:
        middle = (low + high + 1) // 2
        if any(evaluator.fits(_with(bound, batch_size=candidates[middle])) for bound in bounds):
            low = middle
        else:
            high = middle - 1
    return _cheapest_fitting(evaluator, _with(base, batch_size=candidates[low]), knobs)


def _min_ranks_in_mode(
    evaluator: _Evaluator, base: TrainingConfig, knobs: list[_Knob], lowest: int, highest: int
) -> tuple[int, TrainingConfig] | None:
    """Fewest data-parallel ranks in lowest..highest at which some knob setting fits base (ZeRO-3).

    Ranks are counted at micro-batch 1 (gradient accumulation keeps the batch),
    then the micro-batch is made as large as those ranks allow.
    """
    group = base.tp * base.pp
    best: int | None = None
    for bound in _upper_bounds(knobs):
        config = _with(base, batch_size=1, **_changes(knobs, bound))
        top = highest if best is None else best - 1
        if top < lowest:
            break
        ranks = _smallest_fitting_ranks(lambda n: evaluator.peak(_with(config, gpus=n * group)), evaluator.memory, lowest, top)
        if ranks is not None:
            best = ranks
    if best is None:
        return None
    found = _fit_in_mode(evaluator, _with(base, gpus=best * group), knobs)
    return (best, found) if found is not None else None


def _steps(
    evaluator: _Evaluator, original: TrainingConfig, final: TrainingConfig, mode: _Mode, hardware: dict[str, Any],
    hardware_title: str, hardware_reason: str,
) -> list[Step]:
    """The changes from original to final, grouped into steps in the order they are applied."""
    groups: list[tuple[str, str, dict[str, Any]]] = []
    if mode.changes:
        groups.append((mode.title, mode.reason, dict(mode.changes)))
    if hardware:  # before the knobs: what sharding leaves is what checkpointing and the rest act on
        groups.append((hardware_title, hardware_reason, dict(hardware)))
    for name in ("attention", "optimizer_impl", "precision", "zero", "checkpointing"):
        value = getattr(final, name)
        if value != getattr(original, name) and name not in mode.changes and name not in hardware:
            title = {"attention": "flash attention", "optimizer_impl": "fused AdamW", "precision": f"{value} autocast",
                     "zero": f"ZeRO-{value}", "checkpointing": f"{value} activation checkpointing"}[name]
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
        delta = {flag_name(name): (getattr(original, name), value) for name, value in changes.items()
                 if getattr(original, name) != value}
        current = _with(current, **changes)
        budget = evaluator.budget(current)
        if delta:
            steps.append(Step(title, reason, delta, None if budget is None else budget.device_peak_bytes))
    return steps


def _plan(
    evaluator: _Evaluator, original: TrainingConfig, final: TrainingConfig, mode: _Mode,
    hardware: dict[str, Any] | None = None, hardware_title: str = "", hardware_reason: str = "",
) -> Plan:
    hardware = hardware or {}
    steps = _steps(evaluator, original, final, mode, hardware, hardware_title, hardware_reason)
    budget = evaluator.budget(final)
    assert budget is not None and budget.device_peak_bytes <= evaluator.memory  # every plan was estimated to fit
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
         fused AdamW, 16-bit autocast (from 32-true), ZeRO over the data-parallel
         GPUs already there, selective then full checkpointing; if no setting
         fits the micro-batch, the largest micro-batch dividing it that fits
         (with gradient accumulation: the same effective batch);
      2. the same, with 8-bit AdamW; then pure 16-bit weights;
      3. LoRA r=16 on a 16-bit base; then QLoRA (NF4 base);
      4. more hardware: optimizer states offloaded to CPU RAM on the same GPUs;
         then ZeRO-3 over the fewest GPUs any training mode needs (ties go to
         the least invasive mode).
    Within a rung, option costs add up (flash = fused = 1, autocast = selective = 2,
    full checkpointing = 3, ZeRO-n = n - current + 1) and the cheapest fitting setting
    wins. So the plan is minimal: undoing any one step, or stopping at an earlier
    rung, does not fit. When the plan changes what is trained, `alternatives`
    gives the least hardware that fits while training as configured.
    """
    if not 0.0 <= margin < 1.0:
        raise InputError("--margin", f"{margin * 100:g} is not a percentage of the card to leave free", "0 to under 100")
    evaluator = _Evaluator(config, model, gpu, margin)
    original = evaluator.strict_budget(config)
    if original.fits:
        message = f"fits as configured: peak {format_gib(original.device_peak_bytes)} of {format_gib(evaluator.memory)}"
        return Suggestion(True, None, [], original, message, evaluator.estimates)

    modes = _modes(config, evaluator.gpu)

    def in_mode(mode: _Mode, base: TrainingConfig) -> TrainingConfig:
        return _with(base, **mode.changes)

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
        return Suggestion(False, None, [], original, message, evaluator.estimates)
    message = (
        f"{plan.summary}: peak {format_gib(plan.budget.device_peak_bytes)} of {memory} "
        f"(was {format_gib(original.device_peak_bytes)}; leaves at least {margin * 100:g}% free)"
    )
    return Suggestion(False, plan, alternatives, original, message, evaluator.estimates)


def _hardware_plans(
    evaluator: _Evaluator, config: TrainingConfig, modes: list[_Mode], *, first_only: bool
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
            base = _with(_with(config, **mode.changes), **hardware)
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
            base = _with(_with(config, **mode.changes), zero=3)
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


# ---------------------------------------------------------------------------
# All questions at once
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FitReport:
    """The answers `memtui fit` prints; a question not asked is None."""

    config: TrainingConfig
    budget: Budget
    max_batch: MaxBatchResult | None = None
    max_seq: MaxSeqResult | None = None
    min_gpus: MinGpusResult | None = None
    suggestion: Suggestion | None = None

    def as_json(self) -> dict:
        return {
            "config": _config_json(self.config),
            "device_peak_bytes": self.budget.device_peak_bytes,
            "gpu_memory_bytes": self.budget.gpu.memory_bytes,
            "fits": self.budget.fits,
            "max_batch": None if self.max_batch is None else self.max_batch.as_json(),
            "max_seq": None if self.max_seq is None else self.max_seq.as_json(),
            "min_gpus": None if self.min_gpus is None else self.min_gpus.as_json(),
            "suggest": None if self.suggestion is None else self.suggestion.as_json(),
        }


def fit_report(
    config: TrainingConfig,
    *,
    max_batch: bool = True,
    max_seq: bool = True,
    gpus: bool = True,
    suggestion: bool = True,
    zero: int | None = None,
    seq_multiple: int = 1,
    margin: float = DEFAULT_MARGIN,
    model: ModelSpec | None = None,
    gpu: GpuSpec | None = None,
) -> FitReport:
    """Answer the chosen questions for one config (the model and GPU resolved once)."""
    model = model or resolve_model(config.model)
    gpu = gpu or resolve_gpu(config.gpu)
    budget = estimate(config, model=model, gpu=gpu)
    return FitReport(
        config=config,
        budget=budget,
        max_batch=max_batch_size(config, model=model, gpu=gpu) if max_batch else None,
        max_seq=max_seq_len(config, model=model, gpu=gpu, multiple_of=seq_multiple) if max_seq else None,
        min_gpus=min_gpus(config, zero=zero, model=model, gpu=gpu) if gpus else None,
        suggestion=suggest(config, model=model, gpu=gpu, margin=margin) if suggestion else None,
    )
