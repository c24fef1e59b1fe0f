"""min_gpus: the fewest GPUs (data-parallel ranks, tp and pp kept) for a ZeRO stage."""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig
from memtui.engine.planning.fit.search import (
    BATCH_LIMIT,
    GPU_LIMIT,
    Evaluator,
    budget_json,
    smallest_fitting_ranks,
    with_changes,
)
from memtui.engine.units import format_gib




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
            "budget": budget_json(self.budget),
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
    evaluator = Evaluator(config, model, gpu)
    budget = evaluator.strict_budget(config)
    if evaluator.model.family == "generic":
        # Its traced layers are one GPU's step: data parallelism and ZeRO are not modelled for it.
        fits = budget.device_peak_bytes <= evaluator.memory
        message = (f"1 x {evaluator.gpu.id}; peak {format_gib(budget.device_peak_bytes)} of "
                   f"{format_gib(evaluator.memory)}" if fits else
                   f"not on one {evaluator.gpu.id} ({format_gib(budget.device_peak_bytes)} of "
                   f"{format_gib(evaluator.memory)})")
        message += "; a generic model (traced layers) is modelled on one GPU only"
        return MinGpusResult(1 if fits else None, 1 if fits else None, 0, 1, budget, message, evaluator.estimates)
    return _min_gpus(evaluator, with_changes(config, zero=zero), limit)


def _min_gpus(evaluator: Evaluator, config: TrainingConfig, limit: int) -> MinGpusResult:
    zero = config.zero
    group = config.tp * config.pp
    highest = max(1, min(limit, BATCH_LIMIT) // group)
    limit_gpus = highest * group

    def at(ranks: int) -> TrainingConfig:
        return with_changes(config, gpus=ranks * group)

    ranks = smallest_fitting_ranks(lambda n: evaluator.peak(at(n)), evaluator.memory, 1, highest if zero else 1)
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
