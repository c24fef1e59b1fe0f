"""From a traced allocation log to a Budget with the same schema as the estimator's."""

from __future__ import annotations

from memtui.engine.allocator import DEFAULT_CONFIG, AllocatorConfig, replay
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes, cuda_context_bytes, reserved_from_allocated
from memtui.engine.model.specs import Budget, Components, GpuSpec, GpuSummary, ModelStates, ModelSummary, TimelinePoint, TrainingConfig
from memtui.engine.trace.analysis import allocation_sequence, summarize
from memtui.engine.trace.fake_step import StepExtras
from memtui.engine.trace.result import TraceResult
from memtui.engine.trace.tracker import MemoryLog

_PHASE_ORDER = ("forward", "loss", "backward", "optimizer")


def _steady_states(log: MemoryLog, step: int) -> ModelStates:
    """Weights, gradients and optimizer states live at the start of `step` (gradients: at their peak)."""
    weights = optimizer = gradients = 0
    for alloc in log.allocations.values():
        if alloc.host:
            continue
        if alloc.category == "weights" and alloc.phase == "setup":  # not FSDP2's gathered copies, made in the step
            weights += alloc.nbytes
        elif alloc.category == "optimizer_states":
            optimizer += alloc.nbytes
        elif alloc.category == "gradients" and alloc.step == step:
            gradients += alloc.nbytes
    return ModelStates(weights=weights, gradients=gradients, optimizer_states=optimizer)


def assemble(
    config: TrainingConfig,
    local: TrainingConfig,
    spec: ModelSpec,
    gpu: GpuSpec,
    log: MemoryLog,
    extras: StepExtras,
    *,
    notes: list[str],
    alloc_config: AllocatorConfig = DEFAULT_CONFIG,
    parallel: tuple[list[str], list[str]] = ([], []),
) -> TraceResult:
    summary = summarize(log)
    traced = [
        f"{spec.architecture} ({spec.num_layers} layers), 2 training steps on fake tensors",
        f"precision {config.precision}" + (" (autocast with CUDA's op policy)" if config.autocast else ""),
        f"attention {config.attention} ({'SDPA' if config.attention == 'flash' else 'eager'}), checkpointing {config.checkpointing}",
        f"optimizer {config.optimizer} ({config.optimizer_impl})",
    ]
    if config.uses_lora:
        traced.append(f"LoRA r={config.lora_rank} on {config.lora_targets} (peft)")
    modelled = ["CUDA context, cuBLAS workspaces and allocator slack (not tensors the step creates)"]
    if config.quant != "none":
        modelled.append(f"{config.quant} weights: bitsandbytes replaced by allocation-exact replicas")
    if config.optimizer in ("sgd", "sgd-momentum") and config.optimizer_impl == "fused":
        modelled.append("fused SGD: traced as its foreach twin, which allocates the same (fused SGD has no fake kernel)")
    if config.optimizer == "adamw-8bit":
        modelled.append("8-bit AdamW: bitsandbytes replaced by an allocation-exact replica")
    # Data parallelism traced at the real world size (engine/trace/parallel.py): what it ran, what it modelled.
    traced += parallel[0]
    modelled += parallel[1]

    distributed = config != local
    if distributed:
        modelled.append("ZeRO / tensor / pipeline parallel sharding: estimator, applied to the single-GPU trace")

    breakdown = dict(summary.breakdown)
    traced_peak = summary.peak_bytes
    phase_peak = summary.peak_phase

    if distributed:
        sharded = estimate(config, model=spec, gpu=gpu)
        unsharded = estimate(local, model=spec, gpu=gpu)
        for name in ("weights", "gradients", "optimizer_states"):
            breakdown[name] = getattr(sharded.per_gpu, name)
        if config.tp > 1 or config.pp > 1:
            scale_activations = sharded.per_gpu.activations / max(unsharded.per_gpu.activations, 1)
            breakdown["activations"] = int(breakdown["activations"] * scale_activations)
        traced_peak = sum(breakdown.values())

    workspace = cublas_workspace_bytes(gpu)
    tensor_peak = traced_peak + workspace
    allocator = _replay_allocator(log, gpu, workspace, alloc_config) if not distributed else None
    if distributed:
        modelled.append("reserved peak: not replayed (the allocation sequence traced is a single GPU's, unsharded)")
    else:
        modelled.append("reserved peak: the traced allocations and frees, with the cuBLAS workspaces, replayed "
                        "through a model of the CUDA caching allocator"
                        + (f" ({alloc_config.text})" if alloc_config.text else ""))
    reserved = reserved_from_allocated(tensor_peak, summary.largest_allocation)
    overhead = cuda_context_bytes(gpu) + (reserved - tensor_peak) + workspace
    per_gpu = Components(overhead=overhead, **breakdown)
    device_peak = traced_peak + overhead

    states = _steady_states(log, step=2)
    if distributed:
        states = sharded.model_states

    steady = [phase for phase in summary.phases if phase.step == 2]
    timeline = []
    if steady:
        timeline.append(TimelinePoint(phase="start", bytes=steady[0].start_bytes))
        for name in _PHASE_ORDER:
            peaks = [phase.peak_bytes for phase in steady if phase.phase == name]
            if peaks:
                timeline.append(TimelinePoint(phase=name, bytes=max(peaks)))
        timeline.append(TimelinePoint(phase="end", bytes=steady[-1].peak_bytes if steady[-1].phase == "end" else steady[-1].start_bytes))

    budget = Budget(
        model=ModelSummary(id=spec.id, params=spec.params, trainable_params=extras.trainable_params),
        gpu=GpuSummary(id=gpu.id, memory_bytes=gpu.memory_bytes),
        config=config.model_dump(),
        model_states=states,
        per_gpu=per_gpu,
        tensor_peak_bytes=tensor_peak,
        reserved_peak_bytes=allocator["reserved_peak_bytes"] if allocator else None,
        device_peak_bytes=device_peak,
        fits=device_peak <= gpu.memory_bytes,
        headroom_bytes=gpu.memory_bytes - device_peak,
        bytes_per_param=states.total / spec.params,
        peak_phase=phase_peak,
        timeline=timeline,
        notes=notes,
        method="trace",
    )
    top = [
        {"bytes": a.nbytes, "category": a.category, "op": a.op, "shape": list(a.shape), "dtype": a.dtype,
         "phase": a.phase, "step": a.step}
        for a in summary.top_at_peak
    ]
    phases = [
        {"step": p.step, "phase": p.phase, "start_bytes": p.start_bytes, "peak_bytes": p.peak_bytes}
        for p in summary.phases
    ]
    samples = [{"event": i, "bytes": b, "phase": ph} for i, b, ph in summary.samples]
    return TraceResult(
        budget=budget,
        traced=traced,
        modelled=modelled,
        seconds=0.0,
        peak_step=summary.peak_step,
        peak_phase=summary.peak_phase,
        phase_peaks=phases,
        top_allocations=top,
        samples=samples,
        traced_tensor_peak_bytes=traced_peak,
        allocator=allocator,
    )


def _replay_allocator(log: MemoryLog, gpu: GpuSpec, workspace: int, config: AllocatorConfig) -> dict:
    """The caching allocator's figures over the traced step (cuBLAS and cuBLASLt workspaces: one each)."""
    sequence = allocation_sequence(log, before_forward=(workspace // 2, workspace - workspace // 2))
    result = replay(sequence, config, device_total=gpu.memory_bytes)
    return {
        "reserved_peak_bytes": result.reserved_peak_bytes,
        "allocated_peak_bytes": result.allocated_peak_bytes,
        "fragmentation_bytes": result.fragmentation_bytes,
        "segments_end": result.segments_end,
        "events": result.events,
        "alloc_conf": config.text,
    }
