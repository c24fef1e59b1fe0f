"""The analytic estimator: TrainingConfig in, Budget out, in microseconds, no torch.

It walks one steady-state training step (the second: optimizer states exist,
gradients were set to None by zero_grad) through its phases and takes the
largest moment:

    start      weights + optimizer states
    forward    + saved activations of every layer (+ autocast's 16-bit weight copies)
    loss       + the logits, their fp32 upcast and the log-softmax over the vocab
    backward   activations are released layer by layer while gradients accumulate
    optimizer  weights + gradients + states + the implementation's temporaries
"""

from __future__ import annotations

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.estimator.moments import activation_moments
from memtui.engine.estimator.layout import (
    INT8_BYTES_PER_PARAM,
    NF4_BYTES_PER_PARAM,
    ParamLayout,
    param_layout,
    trainable_params_total,
)
from memtui.engine.estimator.optimizers import (
    adafactor_state_params,
    galore_state_params,
    state_bytes_per_param,
    step_temp_bytes,
)
from memtui.engine.estimator.overhead import cublas_workspace_bytes, cuda_context_bytes, reserved_from_allocated
from memtui.engine.model.presets import resolve_gpu, resolve_model
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
from memtui.engine.model.validation import check_config, resolve_lora_targets

__all__ = ["estimate"]


_LAYOUTS: dict[tuple, tuple[ModelSpec, ParamLayout]] = {}


def _layout(config: TrainingConfig, model: ModelSpec) -> ParamLayout:
    """param_layout, memoised: the app and the fit solver ask for the same model many times."""
    key = (id(model), config.tp, config.pp, config.lora_rank, config.lora_targets)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    if len(_LAYOUTS) > 256:
        _LAYOUTS.clear()
    layout = param_layout(config, model)
    _LAYOUTS[key] = (model, layout)  # holding the model keeps its id from being reused
    return layout


# peft keeps adapters in fp32 even on a 16-bit base (autocast_adapter_dtype=True): so are their grads and states.
ADAPTER_BYTES = 4


def trainable_bytes(config: TrainingConfig) -> int:
    """Bytes per element of what trains: LoRA adapters are fp32, full fine-tuning trains the stored weights."""
    return ADAPTER_BYTES if config.uses_lora else config.weight_bytes


def _round512(n: float) -> int:
    """The CUDA caching allocator hands out blocks in multiples of 512 bytes."""
    n = int(n)
    return (n + 511) // 512 * 512


def _weights_bytes(config: TrainingConfig, layout: ParamLayout) -> tuple[int, int]:
    """(base weight bytes, adapter bytes) on this GPU before ZeRO sharding."""
    param_bytes = config.weight_bytes
    quantizable = layout.linear_weight_params - layout.expert_params
    if config.quant == "nf4":
        linear = quantizable * NF4_BYTES_PER_PARAM + layout.expert_params * 2
        other = layout.other_params * 2
    elif config.quant == "int8":
        linear = quantizable * INT8_BYTES_PER_PARAM + layout.linear_rows * 4 + layout.expert_params * 2
        other = layout.other_params * 2
    else:
        linear = layout.linear_weight_params * param_bytes
        other = layout.other_params * param_bytes
    adapters = layout.lora_params * ADAPTER_BYTES
    return int(linear + other), int(adapters)


def _optimizer_state_bytes(config: TrainingConfig, model: ModelSpec, layout: ParamLayout) -> tuple[int, int]:
    """(state bytes on this GPU before sharding, one state over the largest group for temporaries)."""
    param_bytes = config.weight_bytes
    trainable = layout.trainable_params
    if config.optimizer == "adafactor":
        if config.uses_lora:  # the adapters: A is r x in, B is out x r, every one a matrix
            rank = config.lora_rank
            shapes = [shape for name in resolve_lora_targets(config, model)
                      for shape in ((rank, model.linear(name).in_features // config.tp),
                                    (model.linear(name).out_features // config.tp, rank))] * layout.layers
        else:
            shapes = [(lin.out_features * lin.experts, lin.in_features) for lin in model.linears] * layout.layers
            shapes.append((model.vocab_size, model.hidden_size))
            if not model.tie_word_embeddings:
                shapes.append((model.vocab_size, model.hidden_size))
        matrix_params = sum(r * c for r, c in shapes)
        state_values = adafactor_state_params(shapes, max(trainable - matrix_params, 0))
        dtype = 4 if config.master_weights else trainable_bytes(config)
        master = 4 * trainable if config.master_weights else 0
        # The foreach step builds a full-size variance estimate for every matrix of the group at once.
        return state_values * dtype + master, matrix_params * dtype
    if config.optimizer == "galore-adamw":
        shapes = [(lin.out_features * lin.experts, lin.in_features) for lin in model.linears] * layout.layers
        projected = sum(r * c for r, c in shapes)
        dtype = 4 if config.master_weights else param_bytes  # the gradients the projector is made from
        states, projectors = galore_state_params(shapes, config.galore_rank, keeps_full_factor=dtype == 4)
        rest = max(trainable - projected, 0)
        total = (states + 2 * rest + projectors) * dtype
        if config.master_weights:
            total += 4 * trainable
        return total, (states // 2 + rest) * dtype
    trained_bytes = trainable_bytes(config)
    per_param = state_bytes_per_param(config, trained_bytes)
    one_state = (4 if config.master_weights else trained_bytes) * trainable
    return int(per_param * trainable), one_state


def estimate(
    config: TrainingConfig, *, model: ModelSpec | None = None, gpu: GpuSpec | None = None
) -> Budget:
    """Predict one training step's memory per GPU for `config`."""
    model = model or resolve_model(config.model)
    gpu = gpu or resolve_gpu(config.gpu)
    notes = check_config(config, model, gpu)
    requested = config
    if config.quant != "none" and model.family == "gpt2":
        config = config.model_copy(update={"quant": "none"})  # Conv1D: bitsandbytes converts nothing (see notes)
    layout = _layout(config, model)
    dp = config.dp
    zero = config.zero if dp > 1 else 0
    param_bytes = config.weight_bytes

    # ---- model states ----------------------------------------------------
    base_weights, adapters = _weights_bytes(config, layout)
    weights_full = base_weights + adapters
    trained_bytes = trainable_bytes(config)
    grads_full = layout.trainable_params * trained_bytes
    states_full, one_state_group = _optimizer_state_bytes(config, model, layout)

    layer_weight_bytes = layout.largest_layer_params * (param_bytes if config.quant == "none" else 1)
    weights = weights_full
    gathered = 0  # ZeRO-3: the layer being computed and the one prefetched, unsharded
    if zero >= 3:
        weights = weights_full // dp
        gathered = min(2, layout.layers) * layer_weight_bytes
    elif zero == 2 and config.offload == "none":
        # FSDP2 without resharding after forward: the 1/dp shards stay beside the gathered weights,
        # and the last layer's all-gather buffer is held until the next all-gather.
        gathered = weights_full // dp + layer_weight_bytes
    if config.offload == "optimizer+params":
        weights = 0
    gradients = grads_full
    if zero >= 2:
        gradients = grads_full // dp
    optimizer_states = states_full
    if zero >= 1:
        optimizer_states = states_full // dp
    if config.offload != "none":
        optimizer_states = 0
        if zero >= 2:
            gradients = 0  # ZeRO-Offload streams gradients to the CPU as they are reduced
    states = ModelStates(weights=weights, gradients=gradients, optimizer_states=optimizer_states)
    # What stays between steps and through the optimizer step: FSDP2 frees gathered weights after backward.
    resting_weights = weights_full // dp if zero == 2 and config.offload == "none" else weights

    # ---- the step's moments ---------------------------------------------
    workspace = cublas_workspace_bytes(gpu)
    step_temp = step_temp_bytes(
        config,
        group_state_bytes=one_state_group // (dp if zero >= 1 else 1),
        largest_tensor_state_bytes=layout.largest_tensor_params * (4 if config.master_weights else trained_bytes),
    )
    if config.master_weights:
        step_temp += grads_full * 2 // (dp if zero >= 1 else 1)  # fp32 copies of the 16-bit grads
    if config.offload != "none":
        step_temp = 0
    # PyTorch DDP (ZeRO-0/1 across ranks) copies every gradient into flat bucket buffers for the
    # all-reduce and keeps them from the first backward on (gradient_as_bucket_view=False, the default).
    ddp_buckets = grads_full if dp > 1 and zero <= 1 else 0
    states_steady = resting_weights + ddp_buckets
    weights = weights + gathered  # through forward and backward
    layer_grads = layout.largest_layer_params * param_bytes if not config.uses_lora else 0

    def gradients_on_gpu(unsharded: int) -> int:
        """Gradients a moment holds: ZeRO-2/3 keep a 1/dp shard plus the bucket being reduced."""
        if unsharded < 0:
            unsharded = grads_full
        if zero >= 2:
            return 0 if config.offload != "none" else unsharded // dp + min(unsharded, layer_grads)
        return unsharded

    # FSDP2 (as memtui trace --gpus N runs it): the root group (embeddings, final norm, head) is gathered from
    # forward's start to backward's end, beside the layers. ZeRO-2: the last layer's all-gather buffer is freed at
    # the root's post-forward, so backward does not hold it. ZeRO-3: two layers in flight in forward and in
    # backward, one at the loss and at backward's first moments (the last layer, gathered again, before its grads).
    root_weight_bytes = (model.embedding_params + model.head_params + model.norm_params) // config.tp * param_bytes
    fsdp_traced = zero >= 2 and config.offload == "none" and config.pp == 1 and config.quant == "none"

    def fsdp_gathered_change(moment) -> int:
        if not fsdp_traced or not moment.is_simulated:
            return 0
        layer_buffer = layer_weight_bytes if moment.phase == "backward" and moment.gradients == 0 else 0
        if zero == 2:
            return -layer_buffer
        in_flight = min(2, layout.layers) if moment.phase == "forward" else 1 if moment.phase == "loss" or layer_buffer else 2
        return root_weight_bytes + in_flight * layer_weight_bytes - gathered

    # (phase, weights, gradients, activations, temporary) per candidate moment; the largest is the peak.
    moments: list[tuple[str, int, int, int, int]] = []
    for moment in activation_moments(
        config, model, layers=layout.layers, linear_weight_params=layout.linear_weight_params
    ):
        copies = moment.autocast_weights
        if not moment.is_simulated and (zero >= 3 or config.quant != "none"):
            copies = min(copies, 2 * layer_weight_bytes)
        moment_weights = weights + fsdp_gathered_change(moment)
        if zero == 2 and config.offload == "none" and not config.uses_lora and grads_full > 0 and moment.gradients > 0:
            # FSDP2 reshards each layer once its backward is done: the gathered weights shrink as gradients grow.
            done = min(moment.gradients / grads_full, 1.0)
            moment_weights = weights - int((weights_full - layer_weight_bytes) * done)
        moments.append((moment.phase, moment_weights, gradients_on_gpu(moment.gradients), moment.activations + copies,
                        moment.temporary + ddp_buckets + workspace))
    moments.append(("optimizer", resting_weights, gradients, 0, step_temp + ddp_buckets + workspace))
    phase_peaks: dict[str, int] = {}
    best, best_total = moments[0], -1
    for moment in moments:
        total = moment[1] + moment[2] + moment[3] + moment[4] + optimizer_states
        if total > phase_peaks.get(moment[0], -1):
            phase_peaks[moment[0]] = total
        if total > best_total:
            best, best_total = moment, total
    peak_phase = best[0]
    tensor_peak = _round512(best_total)

    largest_block = max(max(moment[4] for moment in moments) - workspace - ddp_buckets, 0)
    reserved = reserved_from_allocated(tensor_peak, largest_block)
    context = cuda_context_bytes(gpu)
    overhead = context + (reserved - best_total)  # so that the components add up to the device peak
    per_gpu = Components(weights=best[1], gradients=best[2], optimizer_states=optimizer_states,
                         activations=best[3], temporary=best[4], overhead=overhead)
    device_peak = best_total + overhead

    timeline = [TimelinePoint(phase="start", bytes=states_steady + optimizer_states)]
    timeline += [TimelinePoint(phase=name, bytes=phase_peaks[name]) for name in ("forward", "loss", "backward", "optimizer") if name in phase_peaks]
    timeline.append(TimelinePoint(phase="end", bytes=states_steady + optimizer_states))
    total_params = model.params
    return Budget(
        model=ModelSummary(id=model.id, params=total_params, trainable_params=trainable_params_total(config, model)),
        gpu=GpuSummary(id=gpu.id, memory_bytes=gpu.memory_bytes),
        config=requested.model_dump(),
        model_states=states,
        per_gpu=per_gpu,
        tensor_peak_bytes=tensor_peak,
        device_peak_bytes=device_peak,
        fits=device_peak <= gpu.memory_bytes,
        headroom_bytes=gpu.memory_bytes - device_peak,
        bytes_per_param=states.total / total_params,
        peak_phase=peak_phase,
        timeline=timeline,
        notes=notes,
    )
