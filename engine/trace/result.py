"""What a trace returns: the budget, what was traced and what modelled, and the peak's details."""

from __future__ import annotations

from dataclasses import dataclass, field

from memtui.engine.model.specs import Budget


@dataclass
class TraceResult:
    budget: Budget
    traced: list[str]
    modelled: list[str]
    seconds: float
    peak_step: int
    peak_phase: str
    phase_peaks: list[dict] = field(default_factory=list)
    top_allocations: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    traced_tensor_peak_bytes: int = 0  # tensors the step itself allocated, before modelled additions
    allocator: dict | None = None  # the caching allocator replayed over the trace (None: not replayed)

    def as_json(self) -> dict:
        data = self.budget.model_dump(mode="json")
        data.update(
            method="trace",
            traced=self.traced,
            modelled=self.modelled,
            seconds=round(self.seconds, 3),
            traced_tensor_peak_bytes=self.traced_tensor_peak_bytes,
            peak_step=self.peak_step,
            phase_peaks=self.phase_peaks,
            top_allocations=self.top_allocations,
            allocator=self.allocator,
        )
        return data
