"""max_batch_size: the largest micro-batch per data-parallel rank that fits."""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig
from memtui.engine.planning.fit.search import BATCH_LIMIT, Evaluator, budget_json, largest_fitting, with_changes
from memtui.engine.units import format_gib




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
            "budget": budget_json(self.budget),
            "next_device_peak_bytes": None if self.over_budget is None else self.over_budget.device_peak_bytes,
            "estimates": self.estimates,
        }


def max_batch_size(
    config: TrainingConfig, *, model: ModelSpec | None = None, gpu: GpuSpec | None = None, limit: int = BATCH_LIMIT
) -> MaxBatchResult:
    """Largest micro-batch (per data-parallel rank) at config's sequence length that fits."""
    evaluator = Evaluator(config, model, gpu)
    evaluator.strict_budget(config)
    return _max_batch(evaluator, config, limit)


def _max_batch(evaluator: Evaluator, config: TrainingConfig, limit: int) -> MaxBatchResult:
    limit = max(1, min(limit, BATCH_LIMIT))
    # --pp: the batch is split into --microbatches equal micro-batches, so only multiples of that count are batches.
    step = config.microbatches if config.pp > 1 else 1

    def sized(batch: int) -> TrainingConfig:
        return with_changes(config, batch_size=batch * step)

    def peak(batch: int) -> float:
        return evaluator.peak(sized(batch))

    batch, at_cap = largest_fitting(peak, evaluator.memory, max(1, limit // step))
    memory = format_gib(evaluator.memory)
    if batch == 0:
        over = evaluator.budget(sized(1))
        message = (
            f"nothing fits: batch {step} x {config.seq_len} tokens needs {format_gib(over.device_peak_bytes)} "
            f"of {memory}" if over else "nothing fits"
        )
        return MaxBatchResult(0, False, limit, None, over, message, evaluator.estimates)
    budget = evaluator.budget(sized(batch))
    over = None if at_cap else evaluator.budget(sized(batch + 1))
    batch, next_batch = batch * step, (batch + 1) * step
    if at_cap:
        message = f"at least {batch} (the search stops at {limit}); peak {format_gib(budget.device_peak_bytes)} of {memory}"
        return MaxBatchResult(batch, True, limit, budget, None, message, evaluator.estimates)
    message = (
        f"{batch} x {config.seq_len} tokens = {batch * config.seq_len:,} tokens per rank; "
        f"peak {format_gib(budget.device_peak_bytes)} of {memory}"
        + (f" (batch {next_batch} needs {format_gib(over.device_peak_bytes)})" if over else "")
    )
    return MaxBatchResult(batch, False, limit, budget, over, message, evaluator.estimates)
