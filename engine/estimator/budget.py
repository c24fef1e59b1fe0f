"""One way to turn a step's peak into a Budget: the estimator and the tracer both end here."""

from __future__ import annotations

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import (
    Budget,
    Components,
    GpuSpec,
    GpuSummary,
    ModelStates,
    ModelSummary,
    TimelinePoint,
    TrainingConfig,
)


def make_budget(
    config: TrainingConfig,
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    trainable_params: int,
    model_states: ModelStates,
    per_gpu: Components,
    tensor_peak_bytes: int,
    device_peak_bytes: int,
    reserved_peak_bytes: int | None = None,
    peak_phase: str,
    timeline: list[TimelinePoint],
    notes: list[str],
    method: str = "estimate",
    paged_bytes: int = 0,
    offloaded_bytes: int = 0,
) -> Budget:
    """The Budget for a peak: whether it fits, the headroom and bytes per parameter follow from it.

    `paged_bytes`: paged optimizer states in CUDA unified memory, outside `device_peak_bytes` and the
    components as given. They are resident on the card as far as the step leaves room for them beside its
    peak (then in the device peak and the optimizer states); the driver pages the rest out to host memory, so
    they never make a step run out of memory: whether it fits is decided without them."""
    fits = device_peak_bytes <= gpu.memory_bytes
    resident = min(paged_bytes, max(gpu.memory_bytes - device_peak_bytes, 0))
    if paged_bytes:
        device_peak_bytes += resident
        per_gpu = per_gpu.model_copy(update={"optimizer_states": per_gpu.optimizer_states + resident})
        model_states = model_states.model_copy(update={"optimizer_states": model_states.optimizer_states
                                                       + paged_bytes})
    return Budget(
        model=ModelSummary(id=model.id, params=model.params, trainable_params=trainable_params),
        gpu=GpuSummary(id=gpu.id, memory_bytes=gpu.memory_bytes),
        config=config.model_dump(),
        model_states=model_states,
        per_gpu=per_gpu,
        tensor_peak_bytes=tensor_peak_bytes,
        reserved_peak_bytes=reserved_peak_bytes,
        device_peak_bytes=device_peak_bytes,
        fits=fits,
        headroom_bytes=gpu.memory_bytes - device_peak_bytes,
        bytes_per_param=model_states.total / model.params,
        peak_phase=peak_phase,
        timeline=timeline,
        notes=notes,
        method=method,
        paged_bytes=paged_bytes,
        paged_evicted_bytes=paged_bytes - resident,
        offloaded_activation_bytes=offloaded_bytes,
    )
