"""From a traced allocation log to a Budget with the same schema as the estimator's."""

from __future__ import annotations

from memtui.engine.allocator import DEFAULT_CONFIG, AllocatorConfig, replay
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.estimator import estimate
from memtui.engine.estimator.budget import make_budget
from memtui.engine.estimator.overhead import cublas_workspace_bytes, cuda_context_bytes, reserved_from_allocated
from memtui.engine.model.specs import (
    Budget,
    Components,
    GpuSpec,
    ModelStates,
    StageBudget,
    TimelinePoint,
    TrainingConfig,
)
from memtui.engine.trace.analysis import LogSummary, allocation_sequence, summarize
from memtui.engine.trace.fake_step import StepExtras, traced_micro_batches
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


def _what_was_traced(config: TrainingConfig, spec: ModelSpec, compile_untraced: str) -> list[str]:
    traced = [
        f"{spec.architecture} ({spec.num_layers} layers), 2 training steps on fake tensors",
        f"precision {config.precision}" + (" (autocast with CUDA's op policy)" if config.autocast else ""),
        f"attention {config.attention} ({'SDPA' if config.attention == 'flash' else 'eager'}), checkpointing {config.checkpointing}",
        f"optimizer {config.optimizer} ({config.optimizer_impl})",
    ]
    if config.uses_lora:
        traced.append(f"LoRA r={config.lora_rank} on {config.lora_targets} (peft)")
    if config.grad_accum > 1 and config.pp == 1:  # a pipeline's accumulation steps: pipeline_lines
        shown = traced_micro_batches(config)
        rest = f" (the other {config.grad_accum - shown} are the same as the last)" if shown < config.grad_accum else ""
        traced.append(f"gradient accumulation: {shown} of {config.grad_accum} micro-batches per step{rest}")
    if config.optimizer_in_backward:
        traced.append("optimizer stepped in backward: one per parameter, in a post-accumulate-grad hook")
    if config.activation_offload:
        traced.append("activation offloading: torchtune's OffloadActivations hooks (single stream) around the "
                      "decoder; the host copies counted apart (offloaded_activation_bytes)")
    if config.compile and not compile_untraced:
        loss = "" if config.loss == "fused-linear" or config.loss_dtype == "compute" or config.eager_loss else \
            (" and of the loss (torchtune's compute_cross_entropy, per chunk)" if config.loss == "chunked" else
             " and of the loss (transformers' ForCausalLMLoss, one graph)")
        traced.append(f"torch.compile of each decoder layer{loss}: AOTAutograd with inductor's decompositions and "
                      "min-cut partitioner (what is saved for backward), the graphs run op by op without code "
                      "generation; ops inductor fuses make no allocation unless saved, returned or read by a "
                      "matmul or attention kernel"
                      + ("; torchtitan's op-level selective checkpoint traced inside each layer's graph (its policy's "
                         "MUST_SAVE and PREFER_RECOMPUTE tags, honoured by the partitioner)"
                         if config.checkpointing == "selective-op" else ""))
    return traced


def _what_was_modelled(config: TrainingConfig, distributed: bool, alloc_config: AllocatorConfig,
                       parallel_modelled: list[str], compile_untraced: str) -> list[str]:
    modelled = ["CUDA context, cuBLAS workspaces and allocator slack (not tensors the step creates)"]
    if config.quant != "none":
        legacy = " (as before 0.43.2: each 4-bit matmul keeps its input)" if config.bnb_version == "legacy" else ""
        modelled.append(f"{config.quant} weights: bitsandbytes replaced by allocation-exact replicas{legacy}")
    if config.optimizer in ("sgd", "sgd-momentum") and config.optimizer_impl == "fused":
        modelled.append("fused SGD: traced as its foreach twin, which allocates the same (fused SGD has no fake kernel)")
    if config.optimizer == "adamw-8bit":
        modelled.append("8-bit AdamW: bitsandbytes replaced by an allocation-exact replica")
    if config.optimizer in ("paged-adamw-8bit", "paged-adamw"):
        modelled.append(f"{config.optimizer}: bitsandbytes replaced by an allocation-exact replica; the states it "
                        "pages (tensors of 100,000 values or more) are made as CUDA unified memory, outside the "
                        "tensor peak (paged_bytes), resident on the card as far as the step leaves room")
    if config.compile and compile_untraced:
        modelled.append(f"torch.compile: not traced with {compile_untraced}; the step was traced eagerly")
    elif config.compile:
        eager_loss = "; the loss runs eagerly (--eager-loss)" if config.eager_loss else \
            "; Liger's fused kernel and LitGPT's chunked loss run eagerly" \
            if config.loss == "fused-linear" or config.loss_dtype == "compute" else ""
        modelled.append("torch.compile: inductor's in-place buffer reuse and workspaces and graph breaks are not "
                        f"modelled; dynamo is not run (a layer, or the loss, is one graph){eager_loss}")
    modelled += parallel_modelled  # data parallelism traced at the real world size (engine/trace/parallel.py)
    if distributed:
        modelled.append("ZeRO / tensor / pipeline parallel sharding: estimator, applied to the single-GPU trace")
        modelled.append("reserved peak: not replayed (the allocation sequence traced is a single GPU's, unsharded)")
    else:
        modelled.append("reserved peak: the traced allocations and frees, with the cuBLAS workspaces, replayed "
                        "through a model of the CUDA caching allocator, each on the stream it was made on"
                        + (f" ({alloc_config.text})" if alloc_config.text else ""))
    return modelled


def _timeline(summary: LogSummary) -> list[TimelinePoint]:
    """The steady step's start, each phase's peak and its end."""
    steady = [phase for phase in summary.phases if phase.step == 2]
    if not steady:
        return []
    timeline = [TimelinePoint(phase="start", bytes=steady[0].start_bytes)]
    for name in _PHASE_ORDER:
        peaks = [phase.peak_bytes for phase in steady if phase.phase == name]
        if peaks:
            timeline.append(TimelinePoint(phase=name, bytes=max(peaks)))
    timeline.append(TimelinePoint(phase="end", bytes=steady[-1].peak_bytes if steady[-1].phase == "end" else steady[-1].start_bytes))
    return timeline


def _sharded_transients(breakdown: dict[str, int], sharded: Budget, unsharded: Budget, traced_phase: str,
                        workspace: int) -> tuple[dict[str, int], str]:
    """Activations and temporaries of a tensor- or pipeline-parallel rank, from the single-GPU trace's.

    Each traced figure is scaled by the estimator's sharded/unsharded ratio of the same component, which holds
    only where the three figures are of one moment: the traced peak's phase is the unsharded estimate's and the
    sharded one's. Where they differ (a single GPU of a large model peaks in the optimizer step, with no
    activations alive, while its shard peaks in backward), the traced moment says nothing of the rank's, and
    the estimator's figures for the rank are taken as they are, and so is its peak's phase.
    """
    same_moment = traced_phase == unsharded.peak_phase == sharded.peak_phase
    scaled = {}
    for name in ("activations", "temporary"):
        # The estimator's temporaries hold the cuBLAS workspaces, which the trace's do not (added once, below).
        held = workspace if name == "temporary" else 0
        whole, part = getattr(unsharded.per_gpu, name) - held, getattr(sharded.per_gpu, name) - held
        scaled[name] = int(breakdown[name] * part / whole) if same_moment and whole > 0 else part
    return scaled, traced_phase if same_moment else sharded.peak_phase


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
    distributed = config != local
    breakdown = dict(summary.breakdown)
    traced_peak = summary.peak_bytes
    states = _steady_states(log, step=2)
    peak_phase = summary.peak_phase
    if distributed:
        # The single-GPU trace with the estimator's sharding: its model states, its activations' share.
        sharded = estimate(config, model=spec, gpu=gpu)
        unsharded = estimate(local, model=spec, gpu=gpu)
        for name in ("weights", "gradients", "optimizer_states"):
            breakdown[name] = getattr(sharded.per_gpu, name)
        if config.tp > 1 or config.pp > 1:
            transients, peak_phase = _sharded_transients(breakdown, sharded, unsharded, summary.peak_phase,
                                                         cublas_workspace_bytes(gpu))
            breakdown.update(transients)
        traced_peak = sum(breakdown.values())
        states = sharded.model_states

    workspace = cublas_workspace_bytes(gpu)
    tensor_peak = traced_peak + workspace
    allocator = _replay_allocator(log, gpu, workspace, alloc_config) if not distributed else None
    reserved = reserved_from_allocated(tensor_peak, summary.largest_allocation)
    overhead = cuda_context_bytes(gpu) + (reserved - tensor_peak) + workspace
    budget = make_budget(
        config, spec, gpu,
        trainable_params=extras.trainable_params,
        model_states=states,
        per_gpu=Components(overhead=overhead, **breakdown),
        tensor_peak_bytes=tensor_peak,
        reserved_peak_bytes=allocator["reserved_peak_bytes"] if allocator else None,
        device_peak_bytes=traced_peak + overhead,
        peak_phase=peak_phase,
        timeline=_timeline(summary),
        notes=notes,
        method="trace",
        paged_bytes=log.unified_bytes,
        offloaded_bytes=log.host_peak_bytes,
    )
    return TraceResult(
        budget=budget,
        traced=_what_was_traced(config, spec, extras.compile_untraced) + parallel[0],
        modelled=_what_was_modelled(config, distributed, alloc_config, parallel[1], extras.compile_untraced),
        seconds=0.0,
        peak_step=summary.peak_step,
        peak_phase=summary.peak_phase,
        phase_peaks=[{"step": p.step, "phase": p.phase, "start_bytes": p.start_bytes, "peak_bytes": p.peak_bytes}
                     for p in summary.phases],
        top_allocations=[{"bytes": a.nbytes, "category": a.category, "op": a.op, "shape": list(a.shape), "dtype": a.dtype,
                          "phase": a.phase, "step": a.step} for a in summary.top_at_peak],
        samples=[{"event": i, "bytes": b, "phase": ph} for i, b, ph in summary.samples],
        traced_tensor_peak_bytes=traced_peak,
        allocator=allocator,
    )


def assemble_rank(config: TrainingConfig, spec: ModelSpec, gpu: GpuSpec, rank, *, notes: list[str],
                  alloc_config: AllocatorConfig, modelled: list[str]) -> TraceResult:
    """A pipeline rank's trace as a budget of its own, but for the traced lines (assemble_pipeline adds them)."""
    return assemble(config, config, spec, gpu, rank.log, rank.extras, notes=notes, alloc_config=alloc_config,
                    parallel=([], modelled))


def assemble_pipeline(config: TrainingConfig, spec: ModelSpec, gpu: GpuSpec, ranks, *, notes: list[str],
                      alloc_config: AllocatorConfig, parallel: tuple[list[str], list[str]]) -> TraceResult:
    """Every pipeline rank's trace as a budget of its own (`stages`); the result is the rank with the largest
    tensor peak, as the job needs that much on every GPU. `ranks`: the ranks' traces, or (trace, its
    assemble_rank result) pairs (trace_pipeline's with `finish`, made before the traced lines, `parallel[0]`,
    were known: they are added here)."""
    pairs = [rank if isinstance(rank, tuple) else
             (rank, assemble_rank(config, spec, gpu, rank, notes=notes, alloc_config=alloc_config,
                                  modelled=parallel[1]))
             for rank in ranks]
    ranks = [rank for rank, _result in pairs]
    results = [result for _rank, result in pairs]
    for result in results:
        result.traced = result.traced + parallel[0]
    stages = [StageBudget(rank=rank.rank, stages=rank.stages, layers=rank.layers, embedding=rank.embedding,
                          head=rank.head, tensor_peak_bytes=result.budget.tensor_peak_bytes,
                          peak_phase=result.peak_phase, per_gpu=result.budget.per_gpu)
               for rank, result in zip(ranks, results)]
    peak = max(range(len(results)), key=lambda index: results[index].budget.tensor_peak_bytes)
    result = results[peak]
    result.budget = result.budget.model_copy(update={"stages": stages})
    result.traced = result.traced + [f"the budget is pipeline rank {ranks[peak].rank}'s (stages {ranks[peak].stages}), "
                                     "the largest tensor peak of the ranks"]
    return result


def _replay_allocator(log: MemoryLog, gpu: GpuSpec, workspace: int, config: AllocatorConfig) -> dict:
    """The caching allocator's figures over the traced step (cuBLAS and cuBLASLt workspaces: one each)."""
    sequence = allocation_sequence(log, before_forward=(workspace // 2, workspace - workspace // 2))
    result = replay(sequence, config, device_total=gpu.memory_bytes)
    figures = {
        "reserved_peak_bytes": result.reserved_peak_bytes,
        "allocated_peak_bytes": result.allocated_peak_bytes,
        "fragmentation_bytes": result.fragmentation_bytes,
        "segments_end": result.segments_end,
        "events": result.events,
        "alloc_conf": config.text,
    }
    streams = sorted({stream for _key, _size, stream in sequence})
    if len(streams) > 1:
        # Each stream's pools are its own (a block never moves to another stream's), so each stream's reserved
        # peak is its events' alone; FSDP2's reduce-scatter pool, holding the sharded gradients, is kept apart
        # from the activations freed in backward.
        figures["reserved_by_stream"] = {
            log.stream_names.get(stream, f"stream {stream}"):
                replay([event for event in sequence if event[2] == stream], config,
                       device_total=gpu.memory_bytes).reserved_peak_bytes
            for stream in streams}
    return figures
