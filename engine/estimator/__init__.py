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

from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.estimator.budget import make_budget
from memtui.engine.estimator.generic import generic_estimate
from memtui.engine.estimator.memo import Cache, memoised
from memtui.engine.estimator.moments import (
    Moment,
    ShapeDependent,
    Shaped,
    StepForms,
    offloaded_bytes,
    step_forms,
    symbolic_step_forms,
    undominated,
)
from memtui.engine.estimator.pipeline import StageShards, pipeline_moments, pipeline_sharded_moments, stage_roles
from memtui.engine.estimator.layout import (
    INT8_BYTES_PER_PARAM,
    NF4_BYTES_PER_PARAM,
    ParamLayout,
    ddp_tensor_parallel_embedding_gradients,
    litgpt_buffer_bytes,
    param_layout,
    pipeline_stages_model,
    pipeline_refusal,
    tensor_parallel_embedding_gradient_extra,
    tensor_parallel_embedding_params,
    tensor_parallel_partial_adapter_gradients,
    tensor_parallel_vocabulary_slice,
    zero_offload_refusal,
    tensor_parallel_whole_vocabulary_gradient,
    trainable_params_total,
    trainable_tensor_numels,
    head_adapter_shapes,
    zero_redundancy_largest_share,
)
from memtui.engine.estimator.zero_offload import ONE_ELEMENT, ZeroOffloadOnGpu, zero_offload_on_gpu
from memtui.engine.estimator.optimizers import (
    BNB_ADAM_OPTIMIZERS,
    adafactor_state_params,
    bnb_adam_state_bytes,
    galore_state_params,
    state_bytes_per_param,
    step_temp_bytes,
)
from memtui.engine.estimator.overhead import cublas_workspace_bytes, cuda_context_bytes, reserved_from_allocated
from memtui.engine.estimator.sim.core import BEFORE_LAYERS_BACKWARD, LF, lf_values
from memtui.engine.estimator.sim.program import GRAD_READY, program_shape
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import (
    Budget,
    GpuSpec,
    ModelStates,
    StageBudget,
    TrainingConfig,
)
from memtui.engine.model.validation import check_config, checks_at_a_shape, resolve_lora_targets

__all__ = ["estimate"]


def _per_model(cache: Cache, key: tuple, model: ModelSpec, compute: Callable[[], Any]):
    return memoised(cache, key, model, None, compute)


# The explicit keys of an estimate's memoised work: every option (the step's figures), and every option but the
# batch size and sequence length (the layout and the model states, which neither changes).
_OPTION_NAMES = tuple(TrainingConfig.model_fields)
_all_options = itemgetter(*_OPTION_NAMES)
_shape_free_options = itemgetter(*(name for name in _OPTION_NAMES if name not in ("batch_size", "seq_len")))
_STEPS: Cache = {}  # (check_config's notes, _StepFigures) per option
_OPTION_SETS: Cache = {}  # (layout, model states on the GPU, one optimizer state over the largest group, trainable)
_PROGRAMS_SEEN: Cache = {}  # the option sets and program_shapes estimated at one shape at least
_PLANS: Cache = {}  # _StepPlan (or None) per option set and program_shape, once a second shape of it comes
_CHECKS: Cache = {}  # the rules check_config asks at each shape, per option set


_LAYOUTS: Cache = {}
_BNB_STATES: Cache = {}


def _layout(config: TrainingConfig, model: ModelSpec) -> ParamLayout:
    # every field param_layout reads (LitGPT's fused projections take adapters of their own shapes)
    return _per_model(_LAYOUTS, (config.tp, config.pp, config.lora_rank, config.lora_targets, config.modeling), model,
                      lambda: param_layout(config, model))


def _bnb_states(config: TrainingConfig, model: ModelSpec) -> tuple[int, int]:
    """bnb_adam_state_bytes over this GPU's trainable tensors."""
    return _per_model(_BNB_STATES, (config.optimizer, config.tp, config.pp, config.lora_rank, config.lora_targets,
                                    config.modeling),
                      model, lambda: bnb_adam_state_bytes(config.optimizer, trainable_tensor_numels(config, model)))


# The torch.optim optimizers memtui builds, which ZeroRedundancyOptimizer can rebuild per rank (ZeRO-1).
ZERO_REDUNDANCY_OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adafactor")

def trainable_bytes(config: TrainingConfig) -> int:
    """Bytes per element of what trains: LoRA adapters (fp32 by peft's default, or in the model's dtype with
    --lora-dtype compute; their gradients and states alike), or, fully fine-tuned, the stored weights."""
    return config.adapter_bytes if config.uses_lora else config.weight_bytes


def _copies_masters(config: TrainingConfig) -> bool:
    """Whether --master-weights makes fp32 copies: of 16-bit trained parameters only. fp32 ones (peft's default
    adapters) are their own masters (`.float()` returns the tensor itself), and so are their gradients."""
    return config.master_weights and trainable_bytes(config) < 4


def _autograd_gradient_bytes(config: TrainingConfig) -> int:
    """Bytes per element of the gradients autograd makes: the trained parameters' dtype as the layers see them
    (bf16 where FSDP2 casts the gathered parameters; FSDP2 reduces them into fp32 shards)."""
    return config.compute_bytes if config.fsdp_casts else trainable_bytes(config)


def _gathered_bytes(config: TrainingConfig) -> int:
    """Bytes per element of an unquantized parameter as FSDP2 gathers it for compute: the compute dtype where it
    casts (--fsdp-param-dtype compute), else as stored."""
    return config.compute_bytes if config.fsdp_casts else config.weight_bytes


def _fsdp2_root_params(config: TrainingConfig, model: ModelSpec) -> int:
    """Parameters of FSDP2's root group on this GPU: the embeddings, the final norm and the head."""
    return tensor_parallel_embedding_params(model, config.tp) + (model.head_params + model.norm_params) // config.tp


def _round512(n: float) -> int:
    """The CUDA caching allocator hands out blocks in multiples of 512 bytes."""
    n = int(n)
    return (n + 511) // 512 * 512


def _weights_bytes(config: TrainingConfig, layout: ParamLayout) -> tuple[int, int]:
    """(base weight bytes, adapter bytes) on this GPU before ZeRO sharding."""
    # peft's k-bit prep casts every 16-bit parameter that is not 4-bit to fp32 (a quantized base's norms,
    # embeddings, head, biases and unquantized experts).
    param_bytes = 4 if config.kbit_prep else config.weight_bytes
    unquantized_bytes = 4 if config.kbit_prep else 2
    quantizable = layout.linear_weight_params - layout.expert_params
    if config.quant == "nf4":
        linear = quantizable * NF4_BYTES_PER_PARAM + layout.expert_params * unquantized_bytes
        other = layout.other_params * unquantized_bytes
    elif config.quant == "int8":
        linear = quantizable * INT8_BYTES_PER_PARAM + layout.linear_rows * 4 + layout.expert_params * unquantized_bytes
        other = layout.other_params * unquantized_bytes
    else:
        linear = layout.linear_weight_params * param_bytes
        other = layout.other_params * param_bytes
    adapters = layout.lora_params * config.adapter_bytes
    return int(linear + other), int(adapters)


def _layer_matrix_shapes(model: ModelSpec, layers: int) -> list[tuple[int, int]]:
    """(rows, columns) of every decoder-layer weight matrix on this GPU (stacked experts as one), layer by layer."""
    return [(lin.out_features * lin.experts, lin.in_features)
            for count, linears in model.layer_groups(layers) for lin in linears * count]


def _optimizer_state_bytes(config: TrainingConfig, model: ModelSpec, layout: ParamLayout) -> tuple[int, int, int]:
    """(state bytes on this GPU before sharding, one state over the largest group for temporaries, paged state
    bytes in CUDA unified memory: outside the first figure)."""
    param_bytes = config.weight_bytes
    trainable = layout.trainable_params
    if config.optimizer == "adafactor":
        if config.uses_lora:  # the adapters: A is r x in, B is out x r, every one a matrix
            rank = config.lora_rank
            shapes = [shape for count, linears in model.layer_groups(layout.layers)
                      for shape in [shape for lin in linears if lin.name in resolve_lora_targets(config, model)
                                    for shape in ((rank, lin.in_features // config.tp),
                                                  (lin.out_features // config.tp, rank))] * count]
            shapes += head_adapter_shapes(config, model)
        else:
            shapes = _layer_matrix_shapes(model, layout.layers)
            shapes.append((model.vocab_size, model.hidden_size))
            if not model.tie_word_embeddings:
                shapes.append((model.vocab_size, model.hidden_size))
        matrix_params = sum(r * c for r, c in shapes)
        state_values = adafactor_state_params(shapes, max(trainable - matrix_params, 0))
        dtype = 4 if config.master_weights else trainable_bytes(config)
        master = 4 * trainable if _copies_masters(config) else 0
        # The foreach step builds a full-size variance estimate for every matrix of the group at once.
        return state_values * dtype + master, matrix_params * dtype, 0
    if config.optimizer == "galore-adamw":
        shapes = _layer_matrix_shapes(model, layout.layers)
        projected = sum(r * c for r, c in shapes)
        dtype = 4 if config.master_weights else param_bytes  # the gradients the projector is made from
        states, projectors = galore_state_params(shapes, config.galore_rank, keeps_full_factor=dtype == 4)
        rest = max(trainable - projected, 0)
        total = (states + 2 * rest + projectors) * dtype
        if _copies_masters(config):
            total += 4 * trainable
        return total, (states // 2 + rest) * dtype, 0
    trained_bytes = trainable_bytes(config)
    one_state = (4 if config.master_weights else trained_bytes) * trainable
    if config.optimizer in BNB_ADAM_OPTIMIZERS:  # per tensor: bitsandbytes decides each state's size and place
        allocated, unified = _bnb_states(config, model)
        return allocated + (4 * trainable if _copies_masters(config) else 0), one_state, unified
    per_param = state_bytes_per_param(config, trained_bytes)
    return int(per_param * trainable), one_state, 0


@dataclass(frozen=True)
class _StatesOnGpu:
    """Weights, gradients and optimizer states on one GPU once ZeRO and offload have had their say."""

    dp: int
    zero: int  # the stage in effect (none without offload on a lone GPU: nothing to shard)
    weights_full: int  # unsharded, as stored (base + adapters)
    unsharded: int  # unsharded as FSDP2 gathers them for compute (weights_full, or bf16 where FSDP2 casts)
    grads_full: int  # unsharded
    layer_weight_bytes: int  # the largest layer's weights, as gathered for its compute
    layer_grads: int  # the largest layer's gradients (a reduce-scatter bucket); 0 under LoRA
    states: ModelStates  # between steps: the ZeRO paper's model states
    computing_weights: int  # through forward and backward: + the layers gathered for compute
    resting_weights: int  # between steps and through the optimizer step
    ddp_buckets: int  # PyTorch DDP's flat copy of every gradient (ZeRO-0/1 across ranks)
    paged: int = 0  # paged optimizer states in CUDA unified memory: not in `states`, not in the tensor peak
    tp_embedding_extra: int = 0  # DTensor's embedding backward: the whole vocabulary's gradient (traced TP plan)
    root_weights: int = 0  # FSDP2's root group (embeddings, final norm, head) as gathered; 0 outside FSDP2
    root_gradients: int = 0  # the root group's gradients made before the embedding's (an untied head's, the norm's)
    reduce_widening: int = 1  # reduced (sharded) gradient bytes per byte autograd made: 2 where FSDP2 reduces bf16 in fp32
    layers_gradients: int = 0  # the decoder layers' gradients as autograd makes them (FSDP2: beyond them, the root's)
    host_shards: bool = False  # FSDP2's CPUOffloadPolicy: the shards and their reduced gradients in host memory
    zero_offload: ZeroOffloadOnGpu | None = None  # DeepSpeed's ZeRO-Offload with ZeRO-1 or 2, as traced

    def gradients_at(self, unsharded: int, offload: str) -> int:
        """Gradients a moment holds: ZeRO-2/3 keep a 1/dp shard plus the bucket being reduced. FSDP2 reduces the
        root group's only at backward's end: the head's, made first, stays whole until then."""
        if self.zero >= 2:
            if offload != "none" and not self.host_shards:
                return 0
            held = min(unsharded, self.root_gradients)
            layers = min(unsharded - held, self.layers_gradients)
            held = unsharded - layers  # the embedding's (or a tied weight's summed) gradient, last, is the root's too
            # Each finished layer's shard, the last reduce-scatter input (in the reduce dtype, held until the next
            # reduce), and the layer in progress whole, as autograd makes it (bf16 where FSDP2 casts), until its
            # post-backward.
            per_layer = self.layer_grads // self.reduce_widening
            finished, in_progress = divmod(layers, max(per_layer, 1))
            shards = 0 if self.host_shards else finished * self.layer_grads // self.dp  # on the host, offloaded
            return held + shards + (self.layer_grads if finished else 0) + in_progress
        return unsharded


def _states_on_gpu(config: TrainingConfig, model: ModelSpec, layout: ParamLayout,
                   optimizers: list[list[int]] | None = None) -> tuple[_StatesOnGpu, int]:
    """The model states on one GPU, and one optimizer state over the largest group (for the step's temporaries).
    `optimizers`: the trainable tensors' sizes of each optimizer the GPU steps (a pipeline rank's stages: one each),
    by default one over every trainable tensor on it."""
    dp = config.shard_ranks  # HSDP: ZeRO-2/3 shard within a group of ranks and replicate across the groups
    # ZeRO-Offload runs its stages on one GPU too (its paper's main case); without offload a lone GPU has nothing to shard.
    zero = config.zero if dp > 1 or config.offload != "none" else 0
    base_weights, adapters = _weights_bytes(config, layout)
    base_weights += litgpt_buffer_bytes(config, model)  # one GPU only (validation): no layer split to follow
    weights_full = base_weights + adapters
    grads_full = layout.trainable_params * trainable_bytes(config)
    states_full, one_state_group, paged = _optimizer_state_bytes(config, model, layout)

    follows_fsdp2 = _follows_fsdp2(config, zero)
    layer_weight_bytes = (_fsdp2_layer_bytes(config, layout) if follows_fsdp2 or config.quant == "none"
                          else layout.largest_layer_params)
    # Every parameter as FSDP2 gathers it for compute: in bf16 where it casts them (full fine-tunes only).
    unsharded = weights_full * _gathered_bytes(config) // config.weight_bytes
    # A rank's 1/dp shards, and what no rank shards (a 4-bit layer's quantization statistics; on pipeline stages
    # too, which FSDP2 shards as `memtui trace` runs it)
    stages_fsdp2 = zero >= 2 and config.pp > 1 and config.quant == "nf4" and config.tp == 1 and config.offload == "none"
    whole = _nf4_statistics_bytes(config, layout) if follows_fsdp2 or stages_fsdp2 else 0
    shards = (weights_full - whole) // dp + whole
    weights = weights_full
    gathered = 0  # ZeRO-3: the layer being computed and the one prefetched, unsharded
    if zero >= 3:
        weights = shards
        gathered = min(2, layout.layers) * layer_weight_bytes
    elif zero == 2 and config.offload == "none":
        # FSDP2 without resharding after forward: the 1/dp shards stay beside the gathered weights,
        # and the last layer's all-gather buffer is held until the next all-gather.
        gathered = shards - whole + layer_weight_bytes - (weights_full - unsharded)
    if config.offload == "optimizer+params":
        # Between steps; the layer computed and the one prefetched are gathered onto the GPU. FSDP2 (CPUOffloadPolicy)
        # offloads parameters only: a 4-bit layer's quantization statistics stay on the GPU.
        weights = whole
        gathered = min(2, layout.layers) * layer_weight_bytes
    tp_embedding_extra = tensor_parallel_embedding_gradient_extra(config, model) if layout.embedding else 0
    root_weights = _fsdp2_root_bytes(config, model, zero)
    root_params = _fsdp2_root_params(config, model)
    # A tied head's gradient waits in autograd's input buffer for the embedding's, as whole as an untied head's.
    head_gradient = model.head_params or model.vocab_size * model.hidden_size
    root_gradients = ((head_gradient // config.tp + model.norm_params) * _autograd_gradient_bytes(config)
                      if root_weights and not config.uses_lora else 0)
    # A tied head's Shard(0) gradient comes first; the embedding's whole-vocabulary one is added into it (a
    # temporary of backward's last moment), so the step keeps the rank's 1/tp only. A pipeline stage's embedding
    # has no head beside it, tied or not.
    kept_extra = 0 if model.tie_word_embeddings and config.pp == 1 else tp_embedding_extra
    # The traced plan's Rowwise lora_B gradients, Partial and whole (FSDP2 redistributes them onto B's shards).
    partial = tensor_parallel_partial_adapter_gradients(config, model, layout.layers) * trainable_bytes(config)
    gradients = grads_full // dp if zero >= 2 else grads_full + kept_extra + partial
    if config.optimizer_in_backward:
        gradients = 0  # each is stepped and freed in backward: none survive to the step's end
    optimizer_states = states_full // dp if zero >= 1 else states_full
    if zero == 1 and dp > 1 and not config.master_weights and config.optimizer in ZERO_REDUNDANCY_OPTIMIZERS:
        # PyTorch's ZeRO-1, ZeroRedundancyOptimizer, shards whole tensors: the rank given the embedding holds its
        # states, not 1/dp of all. (fp32 masters are DeepSpeed's mixed precision: its flat, even partition.)
        # Each optimizer (a pipeline stage's) is sharded on its own.
        optimizers = optimizers or [trainable_tensor_numels(config, model)]
        share = sum(zero_redundancy_largest_share(numels, dp) for numels in optimizers)
        optimizer_states = states_full * share // max(sum(sum(numels) for numels in optimizers), 1)
    if config.offload != "none":
        optimizer_states = 0
        if zero >= 2:
            gradients = 0  # ZeRO-Offload streams gradients to the CPU as they are reduced
    zero_offload = None
    if config.deepspeed_offload and zero_offload_refusal(config) is None:
        # DeepSpeedZeroOptimizer (memtui.engine.estimator.zero_offload): the trainable weights in one padded flat
        # buffer; between steps only temp_grad_buffer_for_gpu_offload, no gradients, no DDP buckets.
        zero_offload = zero_offload_on_gpu(config, model, trainable_bytes(config))
        weights += zero_offload.padding
        gradients = zero_offload.offload_buffer
    # What stays between steps and through the optimizer step: FSDP2 frees gathered weights after backward.
    resting_weights = shards if zero == 2 and config.offload == "none" else weights
    # PyTorch DDP (ZeRO-0/1 across ranks) copies every gradient into flat bucket buffers for the
    # all-reduce and keeps them from the first backward on (gradient_as_bucket_view=False, the default).
    ddp_buckets = grads_full if config.dp > 1 and zero <= 1 and zero_offload is None else 0
    on_gpu = _StatesOnGpu(
        dp=dp, zero=zero, weights_full=weights_full, unsharded=unsharded, grads_full=grads_full, layer_weight_bytes=layer_weight_bytes,
        layer_grads=layout.largest_layer_params * config.weight_bytes if not config.uses_lora else 0,
        states=ModelStates(weights=weights, gradients=gradients, optimizer_states=optimizer_states),
        computing_weights=weights + gathered, resting_weights=resting_weights, ddp_buckets=ddp_buckets,
        paged=paged,
        tp_embedding_extra=tp_embedding_extra, root_weights=root_weights, root_gradients=root_gradients,
        reduce_widening=trainable_bytes(config) // _autograd_gradient_bytes(config),
        layers_gradients=(layout.trainable_params - root_params) * _autograd_gradient_bytes(config)
        if root_weights and not config.uses_lora else grads_full,
        host_shards=follows_fsdp2 and config.offload != "none", zero_offload=zero_offload,
    )
    return on_gpu, one_state_group


class StepMoment(NamedTuple):
    """Bytes on one GPU at a candidate peak of the step, beyond the optimizer states; the largest is the peak."""

    phase: str  # forward | loss | backward | optimizer
    weights: int
    gradients: int
    activations: int
    temporary: int

    def total(self, optimizer_states: int) -> int:
        return self.weights + self.gradients + self.activations + self.temporary + optimizer_states


def _optimizer_step_temporaries(config: TrainingConfig, layout: ParamLayout, on_gpu: _StatesOnGpu, one_state_group: int) -> int:
    if config.offload != "none":
        return 0  # the step runs on the CPU
    shards = on_gpu.dp if on_gpu.zero >= 1 else 1
    trained_bytes = trainable_bytes(config)
    temporaries = step_temp_bytes(
        config,
        group_state_bytes=one_state_group // shards,
        largest_tensor_state_bytes=layout.largest_tensor_params * (4 if config.master_weights else trained_bytes),
    )
    if _copies_masters(config):
        temporaries += on_gpu.grads_full * 2 // shards  # fp32 copies of the 16-bit grads
    return temporaries


def _follows_fsdp2(config: TrainingConfig, zero: int) -> bool:
    """Whether the estimator follows FSDP2's program as `memtui trace --gpus N --zero 2|3` runs it: not beside
    pipeline stages; on unquantized weights, or on bitsandbytes' 4-bit ones without tensor parallelism (QLoRA: the
    packed weights sharded, their quantization statistics whole on every rank); with --offload optimizer+params
    over several ranks as CPUOffloadPolicy, beside tensor parallelism too (not DeepSpeed's ZeRO-Offload: one GPU).
    Pipeline stages follow it in memtui.engine.estimator.pipeline (StageShards.host)."""
    offload = config.offload == "none" or (config.offload == "optimizer+params" and config.shard_ranks > 1
                                           and not config.optimizer_in_backward)
    return (zero >= 2 and offload and config.pp == 1
            and (config.quant == "none" or (config.quant == "nf4" and config.tp == 1)))


def _nf4_statistics_bytes(config: TrainingConfig, layout: ParamLayout) -> int:
    """Bytes of the 4-bit layers' quantization statistics (absmax, nested absmax) where FSDP2 shards the packed
    weights: bitsandbytes keeps them in the layer's QuantState, not a parameter, so every rank holds them whole."""
    if config.quant != "nf4":
        return 0
    return int((layout.linear_weight_params - layout.expert_params) * (NF4_BYTES_PER_PARAM - 0.5))


def _fsdp2_layer_bytes(config: TrainingConfig, layout: ParamLayout) -> int:
    """The largest decoder layer's parameters as FSDP2 gathers them: under QLoRA the packed 4-bit weights (half a
    byte each), the 16-bit (k-bit prep: fp32) unquantized ones and the adapters."""
    if config.quant == "none":
        return layout.largest_layer_params * _gathered_bytes(config)
    quantized, experts, other, adapters = layout.largest_layer_parts
    return int(quantized * 0.5) + (experts + other) * _unquantized_bytes(config) + adapters * config.adapter_bytes


def _unquantized_bytes(config: TrainingConfig) -> int:
    """Bytes per element of a quantized base's unquantized parameters (norms, embeddings, head, biases): 16-bit,
    fp32 after peft's k-bit prep."""
    return 4 if config.kbit_prep else 2


def _fsdp2_root_bytes(config: TrainingConfig, model: ModelSpec, zero: int) -> int:
    """FSDP2's root group (`fully_shard` on the model: embeddings, final norm, head) as gathered on this GPU, or 0
    where the estimator does not follow FSDP2's program (ZeRO-0/1, offloading, pipeline stages, int8 weights)."""
    if not _follows_fsdp2(config, zero):
        return 0
    return _fsdp2_root_params(config, model) * (_gathered_bytes(config) if config.quant == "none"
                                                else _unquantized_bytes(config))


def _gathers_layers(config: TrainingConfig, on_gpu: _StatesOnGpu) -> bool:
    """FSDP2 with ZeRO-3 as _fsdp_gathered_change follows it: each layer gathered for its forward and again for its
    backward, one layer more in the layers' backward than before it (compile_step's `layer_gathers`)."""
    return on_gpu.zero >= 3 and _follows_fsdp2(config, on_gpu.zero)


def _fsdp_gathered_change(config: TrainingConfig, model: ModelSpec, layout: ParamLayout, moment: Moment,
                          on_gpu: _StatesOnGpu) -> int:
    """FSDP2 as `memtui trace --gpus N` runs it, against the steady gathered weights: the root group (embeddings,
    final norm, head) is gathered from forward's start to backward's end, beside the layers. ZeRO-2: the last
    layer's all-gather buffer is freed at the root's post-forward, so backward does not hold it. ZeRO-3: two layers
    in flight in forward and in the layers' backward, one at the loss and before the layers' backward (the root's
    pre-backward prefetched the last layer; that layer's pre-backward gathers it and prefetches the next, before
    it makes a gradient: frozen MoE experts under LoRA make none)."""
    if not _follows_fsdp2(config, on_gpu.zero):
        return 0
    if on_gpu.zero == 2:
        return -on_gpu.layer_weight_bytes if moment.phase == "backward" and moment.gradients == 0 else 0
    root_weight_bytes = on_gpu.root_weights
    before_layers = moment.phase == "loss" or moment.segment in BEFORE_LAYERS_BACKWARD
    in_flight = min(2, layout.layers) if moment.phase == "forward" else 1 if before_layers else 2
    gathered = on_gpu.computing_weights - on_gpu.states.weights
    return root_weight_bytes + in_flight * on_gpu.layer_weight_bytes - gathered


def _fsdp2_root_moments(config: TrainingConfig, model: ModelSpec, moments: list[StepMoment], on_gpu: _StatesOnGpu,
                         workspace: int, held: int) -> list[StepMoment]:
    """The root group's all-gathers and its backward's end, as `memtui trace --gpus N` runs FSDP2. Its all-gather
    output (a flat buffer of the gathered size) lives beside the gathered weights: in forward until layer 0's
    all-gather (FSDP2 keeps the last all-gather's output until the next), at backward's start (ZeRO-3, which
    resharded the root after forward) while it is copied out, before any layer is gathered again. The
    embedding's backward is the last: every layer is resharded by then, the root still gathered; under DTensor's
    plan the whole vocabulary's gradient is made and this rank's slice cloned out of it. `held`: what the step
    holds from the loss's end to backward's first op (StepForms.held_after_forward)."""
    root = on_gpu.root_weights
    moments = list(moments)
    first = moments[0]
    if first.phase == "forward":
        moments.insert(0, first._replace(weights=on_gpu.resting_weights + root + on_gpu.layer_weight_bytes,
                                         temporary=first.temporary + root))
    backward = next((index for index, moment in enumerate(moments) if moment.phase == "backward"), None)
    if on_gpu.zero >= 3 and backward is not None:
        moments.insert(backward, StepMoment("backward", on_gpu.states.weights + root, 0, held,
                                            root + on_gpu.ddp_buckets + workspace))
    last = moments[-1]
    if last.phase == "backward" and not config.uses_lora:
        vocabulary = tensor_parallel_whole_vocabulary_gradient(config, model) if config.dp > 1 else 0
        if vocabulary and model.tie_word_embeddings:
            # A tied weight's two gradients are summed out of place (the step program's sum): the embedding's
            # Shard(0) gradient added is a view of the whole vocabulary's, not cloned out of it as an untied
            # embedding's is, so the program's 1/tp embedding gradient is part of the whole one.
            vocabulary -= tensor_parallel_vocabulary_slice(config, model)
        moments[-1] = last._replace(weights=on_gpu.resting_weights + root, temporary=last.temporary + vocabulary)
        if config.tp == 1:
            # The root's post-backward: resharded, its gradients (as autograd made them) copied into one flat
            # reduce-scatter input in the reduce dtype, beside the layers' shards, before they are let go.
            root_params = _fsdp2_root_params(config, model)
            unsharded = root_params * _autograd_gradient_bytes(config)
            reduce_input = root_params * trainable_bytes(config)
            shards = 0 if on_gpu.host_shards else on_gpu.layers_gradients * on_gpu.reduce_widening // on_gpu.dp
            moments.append(StepMoment("backward", on_gpu.resting_weights, shards, 0,
                                      unsharded + reduce_input + on_gpu.ddp_buckets + workspace))
    return moments


def _forward_backward_moment(config: TrainingConfig, model: ModelSpec, layout: ParamLayout, moment: Moment,
                             on_gpu: _StatesOnGpu, workspace: int, gradients: int | None = None,
                             extra_temporary: int = 0) -> StepMoment:
    """`gradients`: what the moment holds when it is not the first micro-batch's (accumulated, or stepped in
    backward); `extra_temporary`: a new gradient not yet added in place, or a per-parameter step's temporaries."""
    weights = on_gpu.computing_weights + _fsdp_gathered_change(config, model, layout, moment, on_gpu)
    if (on_gpu.zero == 2 and config.offload == "none" and not config.uses_lora and on_gpu.grads_full > 0
            and moment.gradients > 0):
        # FSDP2 reshards each layer at its post-backward, once all its gradients are made: whole layers, counted
        # after the root group's gradients (the head's come first; the root's parameters stay until backward's
        # end). The last layer's all-gather buffer went at the root's post-forward.
        layer_gradients = layout.largest_layer_params * _autograd_gradient_bytes(config)
        done = max(moment.gradients - on_gpu.root_gradients, 0) // max(layer_gradients, 1)
        resharded = min(done * on_gpu.layer_weight_bytes, on_gpu.unsharded - on_gpu.root_weights)
        weights = on_gpu.computing_weights - on_gpu.layer_weight_bytes - resharded
    if gradients is None:
        gradients = on_gpu.gradients_at(moment.gradients, config.offload)
    return StepMoment(moment.phase, weights, gradients, moment.activations + moment.autocast_weights,
                      moment.temporary + on_gpu.ddp_buckets + workspace + extra_temporary)


def _new_gradients(moments: list[Moment], largest_grad: int) -> list[int]:
    """The gradient each moment has just made (at most the largest trainable tensor's: one parameter's)."""
    made, before = [], 0
    for moment in moments:
        made.append(min(max(moment.gradients - before, 0), largest_grad) if moment.phase == "backward" else 0)
        before = moment.gradients
    return made


def _accumulating_moments(config: TrainingConfig, model: ModelSpec, layout: ParamLayout, moments: list[Moment],
                          on_gpu: _StatesOnGpu, workspace: int) -> list[StepMoment]:
    """The second and later micro-batches of gradient accumulation: the gradients so far stay whole through
    forward and backward (DDP under no_sync: unsharded; FSDP2: its shards, plus the layer being reduced), and
    each new gradient is a temporary until it is added in place. A tied head's new gradient waits in autograd's
    input buffer for the embedding's from the head's backward to backward's end (then the two are summed and
    the sum added in place)."""
    largest_grad = layout.largest_tensor_params * trainable_bytes(config)
    resident = on_gpu.gradients_at(on_gpu.grads_full, config.offload) if on_gpu.zero < 2 else (
        0 if config.offload != "none" else on_gpu.grads_full // on_gpu.dp)
    if not model.tie_word_embeddings:  # DTensor's plan: the first micro-batch's whole-vocabulary embedding gradient
        resident += on_gpu.tp_embedding_extra
    tied = (tensor_parallel_embedding_params(model, config.tp) * trainable_bytes(config)
            if model.tie_word_embeddings and not config.uses_lora and on_gpu.zero < 2 else 0)
    # DDP beside DTensor's plan: _pre_dp_module_transform's from_local nodes run last (memtui.engine.estimator.
    # pipeline.pipeline_sharded_moments), so every new gradient waits until backward's end, and the embedding's
    # backward makes the whole vocabulary's gradient in place of the rank's slice.
    whole, rank_slice = ddp_tensor_parallel_embedding_gradients(config, model) if layout.embedding else (0, 0)
    steps, waiting = [], 0
    for index, (moment, made) in enumerate(zip(moments, _new_gradients(moments, largest_grad))):
        reducing = min(moment.gradients, on_gpu.layer_grads) if on_gpu.zero >= 2 and config.offload == "none" else 0
        if whole:
            made = moment.gradients + (whole - rank_slice if index == len(moments) - 1 else 0)
        steps.append(_forward_backward_moment(config, model, layout, moment, on_gpu, workspace,
                                              gradients=resident + reducing,
                                              extra_temporary=(made + waiting) if on_gpu.zero < 2 else 0))
        if tied and moment.phase == "backward" and made:
            waiting = tied  # the head's, made by the first backward moment that makes one
    return steps


def _in_backward_moments(config: TrainingConfig, model: ModelSpec, layout: ParamLayout, moments: list[Moment],
                         on_gpu: _StatesOnGpu, workspace: int) -> list[StepMoment]:
    """optimizer_in_backward: each parameter steps in its post-accumulate-grad hook, once the node that made its
    .grad has returned (the replay's GRAD_READY moments: the node's incoming gradient gone), and its gradient goes.
    A gradient summed from several uses (a tied head's, with the embedding's at backward's end; a chunked head's,
    one per chunk) waits in autograd's input buffer until its last use's is in: counted with the gradients."""
    trained = 4 if config.master_weights else trainable_bytes(config)
    grad_bytes = trainable_bytes(config)
    largest_grad = layout.largest_tensor_params * grad_bytes  # the hooks step one parameter at a time

    def step_temporaries(gradient: int) -> int:
        state = min(gradient, largest_grad) // grad_bytes * trained
        return step_temp_bytes(config, group_state_bytes=state, largest_tensor_state_bytes=state) if gradient else 0

    steps = []
    for moment in moments:
        made = temporaries = 0
        if moment.phase == GRAD_READY:
            made = moment.stepped  # the .grad the node made, stepped there
            temporaries = step_temporaries(made)
            moment = moment._replace(phase="backward")
        # A running sum in an input buffer is the gradient to be: counted with the gradients.
        moment = moment._replace(temporary=moment.temporary - moment.buffered)
        steps.append(_forward_backward_moment(config, model, layout, moment, on_gpu, workspace,
                                              gradients=made + moment.buffered, extra_temporary=temporaries))
    return steps


def _zero_offload_moments(config: TrainingConfig, model: ModelSpec, layout: ParamLayout, moments: list[Moment],
                          on_gpu: _StatesOnGpu, workspace: int) -> list[StepMoment]:
    """DeepSpeed's ZeRO-Offload (memtui.engine.estimator.zero_offload): from the first gradient on, the ipg bucket
    beside the gradients autograd has made (ZeRO-1: all of them, to backward's end; ZeRO-2: the one just made, copied
    into the bucket and freed by its hook); a ZeRO-2 reduction run by a gradient's hook beside the moment that makes
    it; at backward's end (the engine's post-backward hook) the rest reduced, with only the weights, the bucket and
    the held gradients left; the optimizer step on the host, the norms and one-element flags on the device."""
    deepspeed = on_gpu.zero_offload
    resident = on_gpu.states.gradients  # temp_grad_buffer_for_gpu_offload

    def in_backward(moment: Moment) -> tuple[bool, Moment]:
        """Whether `moment` is one of the replay's GRAD_READY moments (a node has given parameters their .grad and
        their hooks run: the first makes the bucket; ZeRO-2's copy each into it and free it), and the moment as a
        backward one: a gradient still summing in an input buffer (a tied head's) counted with the gradients, as
        _in_backward_moments does, and the fp16 engine's scaled loss held through backward."""
        ready = moment.phase == GRAD_READY
        return ready, moment._replace(phase="backward" if ready else moment.phase,
                                      temporary=moment.temporary - moment.buffered + (
                                          deepspeed.scaled_loss if ready or moment.phase == "backward" else 0))

    steps, waited, made, started = [], [], [], False
    for moment in moments:
        ready, moment = in_backward(moment)
        started = started or ready
        gradients = resident + moment.buffered + (deepspeed.bucket if started else 0)
        if deepspeed.stage == 1:  # every gradient kept as made to backward's end
            gradients += moment.gradients
        made.append(moment.stepped if ready else 0)
        waited.append(gradients)
        steps.append(_forward_backward_moment(config, model, layout, moment, on_gpu, workspace, gradients=gradients + (
            moment.stepped if ready and deepspeed.stage == 2 else 0)))
    through = deepspeed.made_through

    def moment_of(trigger: int) -> int:
        """The GRAD_READY moment whose bytes hold gradient `trigger` (in backward's order)."""
        total = 0
        for position, stepped in enumerate(made):
            total += stepped
            if stepped and total >= through[trigger]:
                return position
        return len(moments) - 1

    at_end = []
    per_moment = list(steps)
    kept_from = [0] * (len(moments) + 1)  # before the boundary: too-large gradients left whole, from a moment on
    for reduction in deepspeed.reductions + deepspeed.accumulating:
        extra = reduction.held + reduction.norms + reduction.transient
        if deepspeed.stage == 2 and reduction.trigger is not None:
            # Run by the hook of the gradient made at the GRAD_READY moment its bytes are in: that gradient, the
            # bucket and what the reduction holds (not the moment's other new gradients, hooked before it or after)
            trigger = through[reduction.trigger] - (through[reduction.trigger - 1] if reduction.trigger else 0)
            index = moment_of(reduction.trigger)
            kept_from[index + 1] += reduction.keeps
            steps.append(per_moment[index]._replace(gradients=waited[index] + trigger,
                                                    temporary=per_moment[index].temporary + extra))
        else:
            at_end.append(StepMoment("backward", on_gpu.resting_weights, resident + deepspeed.bucket, 0,
                                     workspace + extra + deepspeed.scaled_loss))
    kept = 0
    for index, step in enumerate(per_moment):  # ZeRO-2 before the boundary: the moments beside what is kept
        kept += kept_from[index]
        if kept:
            steps.append(step._replace(gradients=step.gradients + kept))
    if deepspeed.stage == 1 and config.grad_accum > 1:
        # ZeRO-1's later micro-batches: the bucket and every gradient from the first on, each new gradient a
        # temporary until autograd adds it in place
        for moment in moments:
            ready, moment = in_backward(moment)
            steps.append(_forward_backward_moment(
                config, model, layout, moment, on_gpu, workspace,
                gradients=resident + deepspeed.bucket + deepspeed.gradients + moment.buffered,
                extra_temporary=moment.stepped if ready else 0))
    steps += at_end
    # The step: the norms beside the one-element overflow flag, then the norm's (the optimizer on the host)
    steps.append(StepMoment("optimizer", on_gpu.resting_weights, resident, 0, deepspeed.norms + ONE_ELEMENT + workspace))
    return steps


def _step_moments(config: TrainingConfig, model: ModelSpec, layout: ParamLayout, on_gpu: _StatesOnGpu,
                  one_state_group: int, workspace: int, forms: StepForms) -> list[StepMoment]:
    """The step's candidate peaks from the replayed program's `forms`: at one shape (ints), or at every shape of
    the program (Shaped: the figures only add to what depends on the shape, or raise ShapeDependent)."""
    activations = forms.moments
    if on_gpu.zero_offload is not None:
        return _zero_offload_moments(config, model, layout, activations, on_gpu, workspace)
    if config.optimizer_in_backward:
        # Nothing is left for the optimizer phase: every parameter has stepped in backward.
        return _in_backward_moments(config, model, layout, activations, on_gpu, workspace)
    moments = [_forward_backward_moment(config, model, layout, moment, on_gpu, workspace) for moment in activations]
    if on_gpu.tp_embedding_extra and moments and moments[-1].phase == "backward":
        # The embedding's backward is the last: from then on its gradient covers the whole vocabulary.
        moments[-1] = moments[-1]._replace(gradients=moments[-1].gradients + on_gpu.tp_embedding_extra)
    whole, rank_slice = ddp_tensor_parallel_embedding_gradients(config, model) if layout.embedding else (0, 0)
    if whole and moments and moments[-1].phase == "backward":
        # DDP beside DTensor's plan (PyTorch's _pre_dp_module_transform): the embedding's backward (the program's
        # last moment: its 1/tp gradient beside its all-gathered output gradient) makes the whole vocabulary's
        # gradient instead; the output gradient goes, then the rank's slice is cloned out of the whole one.
        last = moments[-1]
        moments[-1] = last._replace(temporary=last.temporary - rank_slice + whole)
        moments.append(last._replace(gradients=last.gradients + rank_slice,
                                     temporary=whole + on_gpu.ddp_buckets + workspace))
    if on_gpu.root_weights and moments:
        moments = _fsdp2_root_moments(config, model, moments, on_gpu, workspace, forms.held_after_forward)
    if config.grad_accum > 1:
        moments += _accumulating_moments(config, model, layout, activations, on_gpu, workspace)
    step_temporaries = _optimizer_step_temporaries(config, layout, on_gpu, one_state_group)
    moments.append(StepMoment("optimizer", on_gpu.resting_weights, on_gpu.states.gradients, 0,
                              step_temporaries + on_gpu.ddp_buckets + workspace))
    return moments


def _timeline(phase_peaks: dict[str, int], on_gpu: _StatesOnGpu) -> list[dict[str, Any]]:
    """Between steps, then the largest moment of each phase (TimelinePoint's fields)."""
    steady = on_gpu.resting_weights + on_gpu.ddp_buckets + on_gpu.states.optimizer_states
    timeline = [{"phase": "start", "bytes": steady}]
    timeline += [{"phase": name, "bytes": phase_peaks[name]} for name in ("forward", "loss", "backward", "optimizer")
                 if name in phase_peaks]
    timeline.append({"phase": "end", "bytes": steady})
    return timeline


def estimate(
    config: TrainingConfig, *, model: ModelSpec | None = None, gpu: GpuSpec | None = None
) -> Budget:
    """Predict one training step's memory per GPU for `config`."""
    model = model or resolve_model(config.model)
    gpu = gpu or resolve_gpu(config.gpu)
    if model.family == "generic":  # a model_type not replayed by hand: its traced program, from the cache
        return generic_estimate(config, model, gpu)
    # A pure function of the options, the model and the GPU, memoised: fit and the planner ask again and again.
    notes, figures = memoised(_STEPS, _all_options(config.__dict__), model, gpu,
                              lambda: _checked_step(config, model, gpu), limit=4096)
    if figures is None:
        return _pipeline_budget(config, model, gpu, list(notes))
    return _budget_of(config, model, gpu, figures, notes)


def _checked_step(config: TrainingConfig, model: ModelSpec,
                  gpu: GpuSpec) -> tuple[tuple[str, ...], _StepFigures | None]:
    """check_config's notes (a refusal raises: nothing is memoised) and the step's figures (None under --pp)."""
    checks = memoised(_CHECKS, _shape_free_options(config.__dict__), model, gpu,
                      lambda: checks_at_a_shape(config, model, gpu), limit=1024)
    notes = tuple(check_config(config, model, gpu, checks))
    return notes, None if config.pp > 1 else _step_figures(config, model, gpu)


def _step_figures(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec) -> _StepFigures:
    """The step at this batch size and sequence length; the model states come from the option set's memo, the
    step's moments from its program's plan (evaluated at the shape) where it has one."""
    shape_free = _shape_free_options(config.__dict__)
    layout, on_gpu, one_state_group, trainable_params = memoised(
        _OPTION_SETS, shape_free, model, gpu, lambda: _option_set(config, model), limit=1024)
    workspace = cublas_workspace_bytes(gpu)
    program = (shape_free, program_shape(config, model))
    first = object()
    plan = None
    if memoised(_PROGRAMS_SEEN, program, model, gpu, lambda: first, limit=1024) is not first:
        # A second shape of this program (fit, the planner as one types): plan it. The first is evaluated at its
        # shape, so a one-off estimate (or the first after a memo is emptied) costs no more than the moments.
        plan = memoised(_PLANS, program, model, gpu,
                        lambda: _step_plan(config, model, layout, on_gpu, one_state_group, workspace), limit=1024)
    if plan is None:
        forms = step_forms(config, model, layers=layout.layers, layer_gathers=_gathers_layers(config, on_gpu))
        moments = _step_moments(config, model, layout, on_gpu, one_state_group, workspace, forms)
        peaks, offloaded = _peaks(moments, on_gpu.states.optimizer_states), forms.offloaded
    else:
        peaks, offloaded = plan.at(lf_values(config.batch_size * config.seq_len, config.seq_len))
    return _figures(config, gpu, on_gpu, peaks, workspace, trainable_params, offloaded)


_Figure = tuple[int, tuple[int, ...]]  # bytes as an offset plus the values of forms (indices into _StepPlan.forms)


class _StepPlan(NamedTuple):
    """The step's moments at every shape that replays one program (an option set and program_shape's), as figures
    (_Figure) over the program's forms, which a shape evaluates once each. Kept: the moments that may be the peak or
    a phase's largest (`totals`, `moments`), and those that may hold the largest temporary (`temporaries`); a total
    or a temporary is (offset, form, form), the index len(forms) standing for no form."""

    forms: tuple[LF, ...]
    totals: tuple[tuple[int, int, int], ...]
    moments: tuple[tuple[str, _Figure, _Figure, _Figure, _Figure], ...]
    temporaries: tuple[tuple[int, int, int], ...]
    offloaded: _Figure
    phases: tuple[tuple[str, tuple[int, ...]], ...]  # each phase's indices into `totals`

    def at(self, values: LF) -> tuple[_Peaks, int]:
        """_peaks and the offloaded bytes at the shape of `values` (lf_values'), as the moments there give them."""
        one, per_token, per_token_seq, per_position, per_position_sq = values
        # lf_eval written out (the same products and sums, in the same order)
        evaluated = [int(f0 * one + f1 * per_token + f2 * per_token_seq + f3 * per_position + f4 * per_position_sq)
                     for f0, f1, f2, f3, f4 in self.forms]
        evaluated.append(0)
        totals = [offset + evaluated[first] + evaluated[second] for offset, first, second in self.totals]
        peak_total = max(totals)
        phase_peaks: dict[str, int] = {}
        for phase, indices in self.phases:
            largest = max([totals[index] for index in indices])
            if largest > -1:  # as _peaks, which keeps a phase's first total above -1
                phase_peaks[phase] = largest

        def figure(offset_forms: _Figure) -> int:
            offset, forms = offset_forms
            for form in forms:
                offset += evaluated[form]
            return offset

        phase, *figures = self.moments[totals.index(peak_total)]
        largest_temporary = max([offset + evaluated[first] + evaluated[second]
                                 for offset, first, second in self.temporaries])
        return (_Peaks(StepMoment(phase, *map(figure, figures)), peak_total, phase_peaks, largest_temporary),
                figure(self.offloaded))


def _step_plan(config: TrainingConfig, model: ModelSpec, layout: ParamLayout, on_gpu: _StatesOnGpu,
               one_state_group: int, workspace: int) -> _StepPlan | None:
    """_step_moments on Shaped forms; None where the step does more than add to what depends on the shape, or a
    total adds more than two forms (the moments are then evaluated at each shape). A moment is dropped from the
    totals where an earlier one of its phase has as much at every shape, and from the temporaries where an earlier
    one has as much temporary: the peak (the first of the largest), each phase's largest and the largest temporary
    stay what they are over every moment."""
    forms = symbolic_step_forms(config, model, layers=layout.layers, layer_gathers=_gathers_layers(config, on_gpu))
    try:
        moments = _step_moments(config, model, layout, on_gpu, one_state_group, workspace, forms)
    except ShapeDependent:
        return None
    optimizer_states = on_gpu.states.optimizer_states
    totals = [moment.total(optimizer_states) for moment in moments]
    if any(isinstance(total, Shaped) and len(total.forms) > 2 for total in totals):
        return None
    peak_candidates = undominated(totals, [moment.phase for moment in moments])
    temporary_candidates = undominated([moment.temporary for moment in moments], [None] * len(moments))
    unique: dict[LF, int] = {}

    def figure(value: int | Shaped) -> _Figure:
        if not isinstance(value, Shaped):
            return value, ()
        return value.offset, tuple(unique.setdefault(form, len(unique)) for form in value.forms)

    plan_moments = tuple((moments[index].phase, *map(figure, moments[index][1:])) for index in peak_candidates)
    plan_totals = [figure(totals[index]) for index in peak_candidates]
    plan_temporaries = [figure(moments[index].temporary) for index in temporary_candidates]
    plan_offloaded = figure(forms.offloaded)
    none = len(unique)  # evaluated[none] is 0

    def padded(offset_forms: _Figure) -> tuple[int, int, int]:
        offset, indices = offset_forms
        return (offset, *indices, *(none,) * (2 - len(indices)))  # type: ignore[return-value]

    phases: dict[str, list[int]] = {}
    for index, moment in enumerate(plan_moments):
        phases.setdefault(moment[0], []).append(index)
    return _StepPlan(tuple(unique), tuple(map(padded, plan_totals)), plan_moments,
                     tuple(map(padded, plan_temporaries)), plan_offloaded,
                     tuple((phase, tuple(indices)) for phase, indices in phases.items()))


class _Peaks(NamedTuple):
    """What the figures take from a step's moments."""

    peak: StepMoment  # the first of the largest totals, as the step meets it
    peak_total: int
    phase_peaks: dict[str, int]  # each phase's largest total
    largest_temporary: int


def _peaks(moments: list[StepMoment], optimizer_states: int) -> _Peaks:
    totals = [moment.total(optimizer_states) for moment in moments]
    peak_total = max(totals)
    phase_peaks: dict[str, int] = {}
    for moment, total in zip(moments, totals):
        if total > phase_peaks.get(moment.phase, -1):
            phase_peaks[moment.phase] = total
    return _Peaks(moments[totals.index(peak_total)], peak_total, phase_peaks,
                  max(moment.temporary for moment in moments))


def _option_set(config: TrainingConfig, model: ModelSpec) -> tuple[ParamLayout, _StatesOnGpu, int, int]:
    layout = _layout(config, model)
    return (layout, *_states_on_gpu(config, model, layout), trainable_params_total(config, model))


class _StepFigures(NamedTuple):
    """make_budget's arguments for a step, as plain data (memoised; the Budget's validation copies them)."""

    trainable_params: int
    model_states: dict[str, int]
    per_gpu: dict[str, int]
    tensor_peak_bytes: int
    device_peak_bytes: int
    peak_phase: str
    timeline: list[dict[str, Any]]
    paged_bytes: int
    offloaded_bytes: int
    config_fields: dict[str, Any]


def _figures(config: TrainingConfig, gpu: GpuSpec, on_gpu: _StatesOnGpu, peaks: _Peaks, workspace: int,
             trainable_params: int, offloaded: int) -> _StepFigures:
    """The figures of a step's moments (their _peaks): the largest is the peak."""
    peak, peak_total = peaks.peak, peaks.peak_total
    optimizer_states = on_gpu.states.optimizer_states
    tensor_peak = _round512(peak_total)
    largest_block = max(peaks.largest_temporary - workspace - on_gpu.ddp_buckets, 0)
    reserved = reserved_from_allocated(tensor_peak, largest_block)
    overhead = cuda_context_bytes(gpu) + (reserved - peak_total)  # so that the components add up to the device peak
    per_gpu = dict(weights=peak.weights, gradients=peak.gradients, optimizer_states=optimizer_states,
                   activations=peak.activations, temporary=peak.temporary, overhead=overhead)
    return _StepFigures(
        trainable_params=trainable_params,
        model_states=on_gpu.states.model_dump(),
        per_gpu=per_gpu,
        tensor_peak_bytes=tensor_peak,
        device_peak_bytes=peak_total + overhead,
        peak_phase=peak.phase,
        timeline=_timeline(peaks.phase_peaks, on_gpu),
        paged_bytes=on_gpu.paged,
        offloaded_bytes=offloaded,
        config_fields=config.model_dump(),
    )


def _budget_of(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, figures: _StepFigures,
               notes: list[str] | tuple[str, ...]) -> Budget:
    return make_budget(config, model, gpu, notes=notes, **figures._asdict())


def _budget(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, layout: ParamLayout, on_gpu: _StatesOnGpu,
            moments: list[StepMoment], workspace: int, notes: list[str]) -> Budget:
    """The Budget of a step's moments: the largest is the peak."""
    figures = _figures(config, gpu, on_gpu, _peaks(moments, on_gpu.states.optimizer_states), workspace,
                       trainable_params_total(config, model), offloaded_bytes(config, model, layers=layout.layers))
    return _budget_of(config, model, gpu, figures, notes)


def _one_layer_params(config: TrainingConfig, model: ModelSpec, *, dense: bool) -> int:
    """Parameters of one decoder layer on this GPU: a DeepSeek-V3 dense one, or one of the model's others."""
    if dense and not model.dense_layers:
        return 0
    kind = model.model_copy(update={"dense_layers": 1 if dense else 0})
    return param_layout(config, kind, stage=(1, False, False)).largest_layer_params


def _stage_shards(config: TrainingConfig, model: ModelSpec, role: tuple[int, int, bool, bool], dp: int) -> StageShards:
    """One pipeline stage's FSDP2 groups: each decoder layer's, and the root's (what no layer holds)."""
    index, layers, first, last = role
    stage_model = pipeline_stages_model(config, model, [index])
    weight, grad = config.weight_bytes, trainable_bytes(config)
    head = (model.vocab_size * model.hidden_size // config.tp + model.norm_params) if last else 0
    root = head + (tensor_parallel_embedding_params(model, config.tp) if first else 0)
    host = config.offload != "none"
    if config.uses_lora:
        # A layer gathers its frozen base (QLoRA: the packed 4-bit weights and 16-bit norms) with its adapters, and
        # only the adapters have gradients; the root group (embedding, final norm, head) is frozen. Each layer is
        # sized as its own kind: DeepSeek-V3's leading dense layers first, far smaller than its MoE ones.
        kinds = ([(stage_model.dense_layers, stage_model.model_copy(update={"dense_layers": 1})),
                  (layers - stage_model.dense_layers, stage_model.model_copy(update={"dense_layers": 0}))]
                 if stage_model.dense_layers else [(layers, stage_model)])
        layer_weights, layer_gradients = [], []
        for count, kind in kinds:
            layout = param_layout(config, kind, stage=(layers, first, last) if kind is stage_model else (1, False, False))
            quantized, experts, other, adapters = layout.largest_layer_parts
            gathered = (_fsdp2_layer_bytes(config, layout) if config.quant != "none"
                        else (quantized + experts + other) * weight + adapters * config.adapter_bytes)
            layer_weights += [gathered] * count
            layer_gradients += [adapters * grad] * count
        root_bytes = _unquantized_bytes(config) if config.quant != "none" else weight
        return StageShards(layer_weights=tuple(layer_weights), layer_gradients=tuple(layer_gradients),
                           root_weights=root * root_bytes, head_gradients=0, root_gradients=0, dp=dp,
                           reshard=config.zero == 3, head=last, host=host)
    # each layer's own: DeepSeek-V3's leading dense layers, then its MoE ones
    per_layer = [params for count, params in (
                     (stage_model.dense_layers, _one_layer_params(config, stage_model, dense=True)),
                     (layers - stage_model.dense_layers, _one_layer_params(config, stage_model, dense=False)))
                 for _layer in range(count)]
    return StageShards(layer_weights=tuple(params * weight for params in per_layer),
                       layer_gradients=tuple(params * grad for params in per_layer), root_weights=root * weight,
                       head_gradients=head * grad, root_gradients=root * grad, dp=dp, reshard=config.zero == 3,
                       head=last, host=host)


def _pipeline_budget(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, notes: list[str]) -> Budget:
    """--pp: every pipeline rank's step through its schedule (memtui.engine.estimator.pipeline), each a budget of
    its own in `stages`; the budget is the rank with the largest tensor peak (every GPU needs that much)."""
    workspace = cublas_workspace_bytes(gpu)
    budgets: list[tuple[Budget, StageBudget]] = []
    for rank in range(config.pp):
        roles = stage_roles(config, model, rank)
        layers = sum(role[1] for role in roles)
        rank_model = pipeline_stages_model(config, model, [role[0] for role in roles])  # its layers' kinds
        layout = param_layout(config, rank_model, stage=(layers, any(role[2] for role in roles),
                                                         any(role[3] for role in roles)))
        on_gpu, _one_state_group = _states_on_gpu(config, rank_model, layout, [
            trainable_tensor_numels(config, pipeline_stages_model(config, model, [role[0]]), stage=role[1:])
            for role in roles])
        if on_gpu.zero >= 2 and pipeline_refusal(config, model) is None:
            # FSDP2 on each stage as `memtui trace` runs it: the stage's shards, what its schedule holds gathered, its
            # gradients unsharded until its last backward reduce-scatters them (memtui.engine.estimator.pipeline)
            shards = {role[0]: _stage_shards(config, model, role, on_gpu.dp) for role in roles}
            moments = [StepMoment(moment.phase, on_gpu.resting_weights + gathered, moment.gradients,
                                  moment.activations + moment.autocast_weights, moment.temporary + workspace)
                       for moment, gathered in pipeline_sharded_moments(config, model, rank, shards)]
        else:
            moments = [_forward_backward_moment(config, rank_model, layout, moment, on_gpu, workspace)
                       for moment in pipeline_moments(config, model, rank)]
        # torchtitan keeps one optimizer per stage and steps them in turn: the largest stage's temporaries.
        temporaries = 0
        for index, stage_layers, first, last in roles:
            stage_model = pipeline_stages_model(config, model, [index])
            stage_layout = param_layout(config, stage_model, stage=(stage_layers, first, last))
            stage_on_gpu, stage_state_group = _states_on_gpu(config, stage_model, stage_layout)
            temporaries = max(temporaries, _optimizer_step_temporaries(config, stage_layout, stage_on_gpu,
                                                                       stage_state_group))
        moments.append(StepMoment("optimizer", on_gpu.resting_weights, on_gpu.states.gradients, 0,
                                  temporaries + on_gpu.ddp_buckets + workspace))
        budget = _budget(config, model, gpu, layout, on_gpu, moments, workspace, notes)
        budgets.append((budget, StageBudget(rank=rank, stages=[role[0] for role in roles], layers=layers,
                                            embedding=any(role[2] for role in roles),
                                            head=any(role[3] for role in roles),
                                            tensor_peak_bytes=budget.tensor_peak_bytes, peak_phase=budget.peak_phase,
                                            per_gpu=budget.per_gpu)))
    peak = max(budgets, key=lambda pair: pair[0].tensor_peak_bytes)[0]
    return peak.model_copy(update={"stages": [stage for _budget_of, stage in budgets]})

