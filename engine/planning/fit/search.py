"""What every fit question shares: a memoising estimator and searches for a memory boundary."""

from __future__ import annotations

import math
from typing import Any, Callable

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig

BATCH_LIMIT = 65_536  # TrainingConfig's own bound on --batch-size
SEQ_LIMIT = 1_048_576  # search cap for models whose positions extrapolate (RoPE)
GPU_LIMIT = 16_384  # search cap for --min-gpus and suggest's "more GPUs"
DEFAULT_MARGIN = 0.05  # the share of the card suggest leaves free

INFINITE = float("inf")




class Evaluator:
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
        return INFINITE if budget is None else budget.device_required_bytes

    def fits(self, config: TrainingConfig) -> bool:
        budget = self.budget(config)
        return budget is not None and budget.device_required_bytes <= self.memory


def boundary(
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
        if probes > 12 or bad_excess == INFINITE or bad_excess <= good_excess:
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


def largest_fitting(peak: Callable[[int], float], target: int, upper: int) -> tuple[int, bool]:
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
            return boundary(peak, target, good, probe, good_peak, value), False
        if probe == upper:
            return upper, True
        previous, (good, good_peak) = (good, good_peak), (probe, value)
        slope = (good_peak - previous[1]) / (good - previous[0])
        guess = good + (target - good_peak) / slope + 1 if slope > 0 else INFINITE
        probe = int(min(max(guess, good + 1), 8 * good, upper))
    return good, good == upper


def smallest_fitting_ranks(peak: Callable[[int], float], target: int, lowest: int, highest: int) -> int | None:
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
    return boundary(
        peak, target, highest, lowest, highest_peak, lowest_peak,
        coordinate=lambda n: 1.0 / n, inverse=lambda u: 1.0 / u if u > 0 else INFINITE,
    )


def with_changes(config: TrainingConfig, **changes: Any) -> TrainingConfig:
    """A copy with fields changed; values come from the option tuples, so no re-validation is needed."""
    return config.model_copy(update=changes)


def budget_json(budget: Budget | None) -> dict | None:
    return None if budget is None else budget.model_dump(mode="json")


def config_json(config: TrainingConfig | None) -> dict | None:
    return None if config is None else config.model_dump(mode="json")
