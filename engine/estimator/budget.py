"""One way to turn a step's peak into a Budget: the estimator and the tracer both end here."""

from __future__ import annotations

from typing import Any

from memtui.engine.estimator.memo import Cache, memoised
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import Budget, Components, GpuSpec, ModelStates, TimelinePoint, TrainingConfig


_PARAMS: Cache = {}


def make_budget(
    config: TrainingConfig,
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    trainable_params: int,
    model_states: ModelStates | dict[str, int],
    per_gpu: Components | dict[str, int],
    tensor_peak_bytes: int,
    device_peak_bytes: int,
    reserved_peak_bytes: int | None = None,
    peak_phase: str,
    timeline: list[TimelinePoint] | list[dict[str, Any]],
    notes: list[str] | tuple[str, ...],
    method: str = "estimate",
    paged_bytes: int = 0,
    offloaded_bytes: int = 0,
    config_fields: dict[str, Any] | None = None,
) -> Budget:
    """The Budget for a peak: whether it fits, the headroom and bytes per parameter follow from it.

    `paged_bytes`: paged optimizer states in CUDA unified memory, outside `device_peak_bytes` and the
    components as given. They are resident on the card as far as the step leaves room for them beside its
    peak (then in the device peak and the optimizer states); the driver pages the rest out to host memory, so
    they never make a step run out of memory: whether it fits is decided without them.

    The parts may come as models or as their fields (`config_fields`: `config.model_dump()`, when the caller has
    it): the Budget and every model in it are built by one validation, which copies what it is given."""
    states = model_states if isinstance(model_states, dict) else model_states.model_dump()
    components = per_gpu if isinstance(per_gpu, dict) else per_gpu.model_dump()
    fits = device_peak_bytes <= gpu.memory_bytes
    resident = min(paged_bytes, max(gpu.memory_bytes - device_peak_bytes, 0))
    if paged_bytes:
        device_peak_bytes += resident
        components = {**components, "optimizer_states": components["optimizer_states"] + resident}
        states = {**states, "optimizer_states": states["optimizer_states"] + paged_bytes}
    params = memoised(_PARAMS, (), model, None, lambda: model.params)  # a sum over every layer's linears
    return Budget.model_validate({
        "model": {"id": model.id, "params": params, "trainable_params": trainable_params},
        "gpu": {"id": gpu.id, "memory_bytes": gpu.memory_bytes},
        "config": config.model_dump() if config_fields is None else config_fields,
        "model_states": states,
        "per_gpu": components,
        "tensor_peak_bytes": tensor_peak_bytes,
        "reserved_peak_bytes": reserved_peak_bytes,
        "device_peak_bytes": device_peak_bytes,
        "fits": fits,
        "headroom_bytes": gpu.memory_bytes - device_peak_bytes,
        "bytes_per_param": (states["weights"] + states["gradients"] + states["optimizer_states"]) / params,
        "peak_phase": peak_phase,
        "timeline": timeline,
        "notes": notes,
        "method": method,
        "paged_bytes": paged_bytes,
        "paged_evicted_bytes": paged_bytes - resident,
        "offloaded_activation_bytes": offloaded_bytes,
    })
