"""The planner's questions, answered with the estimator: what is the most that fits, and what makes it fit.

- max_batch_size: the largest micro-batch per data-parallel rank that fits;
- max_seq_len: the longest sequence that fits (within the model's position limits);
- min_gpus: the fewest GPUs (data-parallel ranks, tp and pp kept) for a ZeRO stage;
- suggest: the least invasive set of option changes that makes a config fit.

One module per question (batch, sequence, gpus, suggestion) over the shared
search; this package re-exports them, so `from memtui.engine.planning.fit import
suggest` keeps working.

"Fits" is Budget.fits: the device peak (what NVML would show) is within the
GPU's memory; suggest aims lower, leaving a margin (DEFAULT_MARGIN, 5%) for
what no estimate sees (fragmentation, another process, a driver update).
Every answer is checked by an estimate at the answer and, where there is one,
at the next value up (or down), so the boundary is exact under the estimator.
The searches (fit.search) bracket the boundary and interpolate between the two
ends (memory is close to linear in the batch and the sequence, and in
1 / data-parallel ranks), falling back to bisection when interpolation stalls,
so a question costs a handful of estimates rather than a scan.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.estimator import estimate
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig
from memtui.engine.planning.fit.batch import MaxBatchResult, max_batch_size
from memtui.engine.planning.fit.gpus import MinGpusResult, default_zero_for_gpus, min_gpus
from memtui.engine.planning.fit.search import BATCH_LIMIT, DEFAULT_MARGIN, GPU_LIMIT, SEQ_LIMIT, config_json
from memtui.engine.planning.fit.sequence import MaxSeqResult, max_seq_len
from memtui.engine.planning.fit.suggestion import Plan, Step, Suggestion, suggest

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
    "default_zero_for_gpus",
    "fit_report",
    "max_batch_size",
    "max_seq_len",
    "min_gpus",
    "suggest",
]




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
            "config": config_json(self.config),
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
