"""Trace two real training steps of the real architecture on fake tensors.

Under torch's FakeTensorMode every tensor has a shape, a dtype and a device but
no data, so a step of Llama-3.1-70B runs on a laptop in seconds and allocates
nothing. The MemoryTracker logs every storage the step creates and frees; the
log is the ground truth the analytic estimator is held to.

What the trace runs for real: the transformers model of the family, autocast
(with CUDA's op policy), transformers' activation checkpointing, SDPA or eager
attention, peft LoRA, and torch.optim's foreach / fused / for-loop code.
What it cannot run on a CPU it replaces or models, and says so in the result:
bitsandbytes kernels (allocation-exact replicas), CUDA context and workspaces.
Data parallelism (DDP, ZeroRedundancyOptimizer, FSDP2, HSDP) is traced for
rank 0 at the real world size on torch's fake process group
(memtui.engine.trace.parallel), and so is tensor parallelism with sequence
parallelism for Llama-layout models, Phi-3, OLMo 2 and the MoE families
(memtui.engine.trace.tensor_parallel, memtui.engine.trace.moe_parallel;
peft's LoRA beside it for all of them, by NeMo Automodel's
LoRA-aware plan: memtui.engine.trace.tensor_parallel_lora),
and pipeline parallelism (every rank of torch.distributed.pipelining's
schedules, memtui.engine.trace.pipeline), alone, with DDP, ZeRO-1, FSDP2 or HSDP
on each stage, or with that tensor parallelism (and FSDP2) on a (pp, dp, tp)
mesh (DDP, ZeRO-1 or HSDP beside the tensor parallelism too, with or without
the pipeline); QLoRA's 4-bit weights under DDP, ZeRO-1 and FSDP2 too, and FSDP2's
CPUOffloadPolicy for --zero 3 --offload optimizer+params (memtui.engine.trace.parallel), and DeepSpeed's
ZeRO-Offload with ZeRO-1 or 2 over data-parallel ranks or on one GPU (a stand-in of DeepSpeedZeroOptimizer:
memtui.engine.trace.zero_offload). DeepSpeed's ZeRO-3 offload, LLM.int8 under FSDP2 and tensor parallelism
outside that plan are still modelled by the estimator on top of a single-GPU trace.

A deep single-GPU model of a family whose layers are all alike is traced at 5 and 6 layers, and its log built
from the 5-layer one by repeating a middle layer (memtui.engine.trace.extend), once that construction has given
the 6-layer log exactly; so is each pipeline stage at a few layers (memtui.engine.trace.pipeline); anything else is
traced at every layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from memtui.engine.allocator import DEFAULT_CONFIG, AllocatorConfig
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import GpuSpec, TrainingConfig
from memtui.engine.model.validation import check_config
from memtui.engine.trace.result import TraceResult

Progress = Callable[[str, float], None]


def _single_gpu(config: TrainingConfig) -> TrainingConfig:
    return config.model_copy(update={"gpus": 1, "tp": 1, "pp": 1, "zero": 0, "offload": "none"})


def _few_layers_extended(spec: ModelSpec, config: TrainingConfig, report: Progress, parallel_context=None):
    """(log, extras, what was done, the parallel program's (traced, modelled) lines) of the whole model from traces
    of a few of its layers (memtui.engine.trace.extend), or None when the model is traced at every layer: the
    configuration is one the extension does not take, or the log of k + 1 layers built from the log of k is not
    the traced one. `parallel_context(config, layers)`: the data- or tensor-parallel program each depth runs in."""
    from memtui.engine.trace.extend import TRACED_LAYERS, NotExtensible, extend_log, extension_refusal, same_log
    from memtui.engine.trace.fake_step import run_fake_steps
    from memtui.engine.trace.generic import at_depth

    if extension_refusal(spec, config) is not None:
        return None
    low, high = TRACED_LAYERS, TRACED_LAYERS + 1

    def run(depth: int):
        """(log, extras, the parallel program's (traced, modelled) lines) of the model cut to `depth` layers."""
        if parallel_context is None:
            return (*run_fake_steps(at_depth(spec, depth), config, report, layer_tags=True), ([], []))
        with parallel_context(config, depth) as parallel:
            log, extras = run_fake_steps(at_depth(spec, depth), config, report, parallel=parallel, layer_tags=True)
        return log, extras, (parallel.traced, parallel.modelled)

    low_log, low_extras, lines = run(low)
    high_log, high_extras, _lines = run(high)
    try:
        if not same_log(extend_log(low_log, low, high), high_log):
            return None
        log = extend_log(low_log, low, spec.num_layers)
    except NotExtensible:
        return None
    added = spec.num_layers - low
    extras = low_extras
    extras.params += added * (high_extras.params - low_extras.params)
    extras.trainable_params += added * (high_extras.trainable_params - low_extras.trainable_params)
    line = (f"layers: traced at {low} and {high}; the {high}-layer step rebuilt event by event from the {low}-layer "
            f"one by repeating a middle layer, exactly, and the {spec.num_layers}-layer step built the same way")
    return log, extras, line, lines


def trace(
    config: TrainingConfig,
    *,
    model: ModelSpec | None = None,
    gpu: GpuSpec | None = None,
    progress: Progress | None = None,
    alloc_config: AllocatorConfig | None = None,
) -> TraceResult:
    """Trace `config`: data parallelism for real, other distributed options modelled on top of a single-GPU
    trace. `alloc_config`:
    the PYTORCH_CUDA_ALLOC_CONF the reserved peak is replayed with (default: torch's defaults)."""
    started = time.perf_counter()
    report = progress or (lambda _stage, _fraction: None)
    spec = model or resolve_model(config.model)
    gpu = gpu or resolve_gpu(config.gpu)
    notes = check_config(config, spec, gpu)

    report("importing torch", 0.0)
    from memtui.engine.trace.fake_step import run_fake_steps

    from memtui.engine.trace.parallel import data_parallel, data_parallel_refusal

    from memtui.engine.trace.tensor_parallel import tensor_parallel, tensor_parallel_refusal

    from memtui.engine.trace.assemble import assemble, assemble_pipeline, assemble_rank
    from memtui.engine.trace.pipeline import pipeline_lines, pipeline_refusal, trace_pipeline

    pp_refusal = pipeline_refusal(config, spec)
    if pp_refusal is None:
        allocator = alloc_config or DEFAULT_CONFIG
        # each rank's budget made as its trace is finished, two at a time (trace_pipeline's `finish`)
        ranks = trace_pipeline(spec, config, report, finish=lambda rank: assemble_rank(
            config, spec, gpu, rank, notes=notes, alloc_config=allocator, modelled=[]))
        lines = pipeline_lines(config, spec) + list(dict.fromkeys(rank.note for rank, _result in ranks if rank.note))
        result = assemble_pipeline(config, spec, gpu, ranks, notes=notes, alloc_config=allocator,
                                   parallel=(lines, []))
        result.seconds = time.perf_counter() - started
        report("done", 1.0)
        return result
    parallel_lines: tuple[list[str], list[str]] = ([], [])
    tp_refusal = tensor_parallel_refusal(config, spec)
    dp_refusal = data_parallel_refusal(config)
    context = tensor_parallel if tp_refusal is None else data_parallel if dp_refusal is None else None
    if context is not None:
        local = config
        extended = _few_layers_extended(spec, local, report, context)
        if extended is not None:
            log, extras, line, parallel_lines = extended
            parallel_lines = (parallel_lines[0] + [line], parallel_lines[1])
        else:
            with context(config, spec.num_layers) as parallel:
                log, extras = run_fake_steps(spec, local, report, parallel=parallel)
            parallel_lines = (parallel.traced, parallel.modelled)
    else:
        local = _single_gpu(config)
        extended = _few_layers_extended(spec, local, report)
        if extended is not None:
            log, extras, line, _lines = extended
            parallel_lines[0].append(line)
        else:
            log, extras = run_fake_steps(spec, local, report)
        modelled = []
        if config.tp > 1:
            modelled.append(f"tensor parallel: modelled, not traced ({tp_refusal})")
        if config.pp > 1:
            modelled.append(f"pipeline parallel: modelled, not traced ({pp_refusal})")
        if config.dp > 1 and config.tp == 1 and config.pp == 1:
            modelled.append(f"data parallel: modelled, not traced ({dp_refusal})")
        elif config.offload != "none" and config.tp == 1 and config.pp == 1:  # one GPU: DeepSpeed's ZeRO-Offload
            modelled.append(f"offloading: modelled, not traced ({dp_refusal})")
        parallel_lines = (parallel_lines[0], modelled)

    result = assemble(config, local, spec, gpu, log, extras, notes=notes, alloc_config=alloc_config or DEFAULT_CONFIG,
                      parallel=parallel_lines)
    result.seconds = time.perf_counter() - started
    report("done", 1.0)
    return result
