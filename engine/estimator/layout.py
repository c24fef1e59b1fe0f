"""Where the parameters live: how many of each kind one GPU holds, and in which dtype.

This is the bookkeeping every other part of the estimator starts from: the
pipeline stage a GPU serves, what tensor parallelism splits, which weights are
frozen, quantized or trained, and what ZeRO shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memtui.engine.model.architectures import LinearLayer, ModelSpec, attention_layer_types
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import adapts_head, litgpt_targets, resolve_lora_targets

# bitsandbytes NF4 with double quantization: 4 bits per weight, one 8-bit absmax per
# 64-weight block, and one fp32 absmax per 256 blocks (QLoRA: 0.127 bits of constants).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# LLM.int8: one byte per weight plus an fp32 scale per output row (SCB).
INT8_BYTES_PER_PARAM = 1.0


@dataclass(frozen=True)
class ParamLayout:
    """Parameter counts on one GPU (the first pipeline stage), before ZeRO sharding."""

    layers: int  # decoder layers on this GPU
    linear_weight_params: int  # weights of the decoder layers' linear layers (quantizable)
    linear_rows: int  # output rows of those linears (int8 keeps a scale per row)
    expert_params: int  # MoE experts' stacked 3D weights: bitsandbytes leaves them unquantized
    other_params: int  # embeddings, norms, biases, router, head
    lora_params: int  # adapter parameters (0 without LoRA)
    trainable_params: int
    largest_layer_params: int  # one decoder layer, for ZeRO-3's gathered layer in flight
    largest_tensor_params: int  # the biggest single trainable parameter tensor
    tensor_count: int  # parameter tensors on this GPU (per-tensor allocator rounding)
    trainable_tensor_count: int
    embedding: bool = True  # whether this GPU holds the embedding (a pipeline rank with the first stage)
    # The largest decoder layer's (quantizable linear weights, experts' stacked weights, other, adapters)
    largest_layer_parts: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def base_params(self) -> int:
        return self.linear_weight_params + self.other_params


def head_adapter_shapes(config: TrainingConfig, model: ModelSpec) -> list[tuple[int, int]]:
    """lm_head's LoRA A (r x hidden) and B (vocab x r), when --lora-targets names lm_head (one GPU only)."""
    if not adapts_head(config):
        return []
    return [(config.lora_rank, model.hidden_size), (model.vocab_size, config.lora_rank)]


# DeepSeek-V3's low-rank query and compressed key/value projections: replicated under tensor parallelism
# (torchtitan's NoParallel), every rank computing the whole latent
REPLICATED = ("q_a_proj", "kv_a_proj_with_mqa")


def tensor_parallel_embedding_params(model: ModelSpec, tp: int) -> int:
    """The embeddings' parameters on a tensor-parallel rank: the token embedding's 1/tp of the vocabulary, and
    GPT-2's learned positions (wpe) whole, replicated as Megatron-LM keeps them."""
    tokens = model.vocab_size * model.hidden_size
    return tokens // tp + model.embedding_params - tokens


def _linear_shard(linear: LinearLayer, tp: int) -> tuple[int, int]:
    """(weight params, output rows) of one linear after tensor parallelism."""
    ranks = 1 if linear.name in REPLICATED else tp
    return linear.weight_params // ranks, linear.out_features * linear.experts // ranks


# Row-parallel linears: RowwiseParallel (and the experts' down projection) keeps their bias whole on every rank,
# added to the partial sums, as torchtitan's and Megatron-LM's plans do
ROW_PARALLEL = ("o_proj", "down_proj", "experts.down_proj", "attn.c_proj", "mlp.c_proj")


def _bias_shard(linear: LinearLayer, tp: int) -> int:
    """Bias parameters of one linear on a rank after tensor parallelism."""
    whole = linear.out_features * linear.experts
    return whole if linear.name in ROW_PARALLEL else whole // tp


def _layer_vectors(model: ModelSpec, tp: int) -> tuple[int, ...]:
    """gpt-oss's router bias (replicated under tensor parallelism) and attention sinks (sharded with the heads)."""
    if not model.layer_vectors:
        return ()
    router_bias, sinks = model.layer_vectors
    return router_bias, sinks // tp


def _named(linears: tuple[LinearLayer, ...], name: str) -> LinearLayer:
    return next(linear for linear in linears if linear.name == name)


def _lora_params(config: TrainingConfig, linears: tuple[LinearLayer, ...], targets: tuple[str, ...], tp: int,
                 sharded: bool = False) -> int:
    """One layer's adapter parameters (A: r x in, B: out x r) for the targets among these linears; `sharded`: as
    the traced plan shards them (lora_tensor_parallel_shapes)."""
    if sharded:
        return sum(sum(_adapter_numels(config, _named(linears, name), tp)) for name in targets)
    if config.modeling == "litgpt":  # one GPU (validation)
        return sum(litgpt_adapter_numels(config, linears, targets))
    return sum(config.lora_rank * (_named(linears, name).in_features + _named(linears, name).out_features) // tp
               for name in targets)


def litgpt_adapter_numels(config: TrainingConfig, linears: tuple[LinearLayer, ...], targets: tuple[str, ...]) -> list[int]:
    """One layer's adapter tensors as LitGPT's LoRA makes them (litgpt/lora.py): LoRAQKVLinear one lora_A of
    (r x enabled slices) x in and one lora_B of the enabled slices' widths x r; LoRALinear (proj, the MLP's fc_1,
    fc_2, proj) r x in and out x r. Phi-3's fused qkv_proj and gate_up_proj become LitGPT's slices and fc_1, fc_2."""
    rank = config.lora_rank
    names = litgpt_targets(targets)
    shapes = {linear.name: (linear.in_features, linear.out_features) for linear in linears}
    if "qkv_proj" in shapes:  # Phi-3: the fused projections split as LitGPT's model has them
        hidden, width = shapes.pop("qkv_proj")
        q_width = next(linear.in_features for linear in linears if linear.name == "o_proj")
        kv_width = (width - q_width) // 2
        shapes.update(q_proj=(hidden, q_width), k_proj=(hidden, kv_width), v_proj=(hidden, kv_width))
        hidden, double = shapes.pop("gate_up_proj")
        shapes.update(gate_proj=(hidden, double // 2), up_proj=(hidden, double // 2))
    slices = [shapes[name][1] for name in ("q_proj", "k_proj", "v_proj") if name in names]
    numels = [rank * len(slices) * shapes["q_proj"][0], sum(slices) * rank] if slices else []
    for name in ("o_proj", "gate_proj", "up_proj", "down_proj"):
        if name in names:
            numels += [rank * shapes[name][0], shapes[name][1] * rank]
    return numels


def litgpt_buffer_bytes(config: TrainingConfig, model: ModelSpec) -> int:
    """LitGPT's LoRAQKVLinear where only some of q, k, v are adapted: its _lora_ind index (int64, one per adapted
    column, litgpt/lora.py:265), made on the first forward and kept as a buffer in every layer."""
    if config.modeling != "litgpt" or not config.uses_lora:
        return 0
    names = litgpt_targets(resolve_lora_targets(config, model))
    enabled = [name for name in ("q_proj", "k_proj", "v_proj") if name in names]
    if len(enabled) in (0, 3):
        return 0
    q_width = model.num_heads * model.head_dim
    kv_width = model.num_kv_heads * model.head_dim
    columns = sum(q_width if name == "q_proj" else kv_width for name in enabled)
    return 8 * columns * model.num_layers


def lora_tensor_parallel_shapes(config: TrainingConfig, model: ModelSpec) -> bool:
    """Whether the adapters are sharded as the traced plan shards them, NeMo Automodel's LoRA-aware styles
    (memtui.engine.trace.tensor_parallel_lora): A's rows on a Colwise linear, B's columns on a Rowwise one, the
    rank dimension cut as DTensor's Shard cuts it (rank 0 the larger chunk where tp does not divide r)."""
    return (config.uses_lora and config.tp > 1 and model.family in LORA_TENSOR_PARALLEL_FAMILIES
            and model.num_kv_heads % config.tp == 0)


def _adapter_numels(config: TrainingConfig, linear: LinearLayer, tp: int) -> tuple[int, int]:
    """(A, B) elements on rank 0 under NeMo Automodel's LoRA-aware plan."""
    rank, local = config.lora_rank, -(-config.lora_rank // tp)
    if linear.name in REPLICATED:  # DeepSeek-V3's NoParallel projections: the adapters replicated whole too
        return rank * linear.in_features, linear.out_features * rank
    if linear.name in ROW_PARALLEL:  # RowwiseParallelLora: A Shard(1) (r x in/tp), B Shard(1) (out x r/tp)
        return rank * linear.in_features // tp, linear.out_features * local
    return local * linear.in_features, linear.out_features // tp * rank  # ColwiseParallelLora: both Shard(0)


def tensor_parallel_partial_adapter_gradients(config: TrainingConfig, model: ModelSpec, layers: int) -> int:
    """Elements of adapter gradient beyond the parameters' shards under the traced plan: a Rowwise linear's lora_B
    gradient comes out of DTensor's backward Partial, every column of B on every rank (traced: DTensor's mm of the
    all-gathered output gradient and lora_A's partial output), which AccumulateGrad keeps as it is."""
    if not lora_tensor_parallel_shapes(config, model):
        return 0
    targets = resolve_lora_targets(config, model)
    rank, local = config.lora_rank, -(-config.lora_rank // config.tp)
    return sum(count * linear.out_features * (rank - local) for count, linears in model.layer_groups(layers)
               for linear in linears if linear.name in targets and linear.name in ROW_PARALLEL)


def _layer_tensors(model: ModelSpec, linears: tuple[LinearLayer, ...]) -> int:
    """Parameter tensors of one decoder layer with these linears."""
    count = len(linears) + sum(1 for linear in linears if linear.bias)
    count += model.norms_per_layer * (2 if model.norm == "layer" else 1)
    count += sum(1 for width in model.qk_norm_widths if width) if model.qk_norm else 0
    count += len(model.layer_vectors)  # gpt-oss: the router's bias and the attention sinks
    return count + (1 if any(linear.experts > 1 for linear in linears) else 0)  # the router


def param_layout(config: TrainingConfig, model: ModelSpec, *, stage: tuple[int, bool, bool] | None = None) -> ParamLayout:
    """`stage`: (layers, first, last) of a pipeline rank; by default the first stage of ceil(L / pp) layers."""
    tp, pp = config.tp, config.pp
    layers, first_stage, last_stage = stage or (math.ceil(model.num_layers / pp), True, pp == 1)
    targets = resolve_lora_targets(config, model)

    # Per kind of decoder layer (DeepSeek-V3: its dense layers, then the MoE ones; one kind elsewhere).
    total_linear = linear_rows_total = expert_total = other_layers = lora = 0
    tensors_layers = 0
    largest_layer = 0
    largest_parts = (0, 0, 0, 0)
    for count, linears in model.layer_groups(layers):
        linear_weights = linear_rows = biases = expert_weights = 0
        for linear in linears:
            weights, rows = _linear_shard(linear, tp)
            linear_weights += weights
            if linear.experts > 1:
                expert_weights += weights  # not an nn.Linear: bitsandbytes does not quantize it
            else:
                linear_rows += rows
            if linear.bias:
                biases += _bias_shard(linear, tp)
        routed = any(linear.experts > 1 for linear in linears)
        layer_other = (biases + model.norms_per_layer * model.norm_params + model.qk_norm_params
                       + (model.router_params if routed else 0) + sum(_layer_vectors(model, tp)))
        lora_per_layer = _lora_params(config, linears, targets, tp, lora_tensor_parallel_shapes(config, model))
        total_linear += count * linear_weights
        linear_rows_total += count * linear_rows
        expert_total += count * expert_weights
        other_layers += count * layer_other
        lora += count * lora_per_layer
        tensors_layers += count * _layer_tensors(model, linears)
        if linear_weights + layer_other + lora_per_layer > largest_layer:
            largest_layer = linear_weights + layer_other + lora_per_layer
            largest_parts = (linear_weights - expert_weights, expert_weights, layer_other, lora_per_layer)

    embedding = tensor_parallel_embedding_params(model, tp) if first_stage else 0
    head = 0
    if last_stage:
        # A last pipeline stage without the embedding holds its own head, tied or not (the stage's copy).
        head_params = model.head_params if first_stage else model.vocab_size * model.hidden_size
        head = head_params // tp + model.norm_params
    other = other_layers + embedding + head

    head_adapters = [rows * columns for rows, columns in head_adapter_shapes(config, model)]
    lora += sum(head_adapters)
    trainable = lora if config.uses_lora else total_linear + other

    lora_tensors = 2 * len(targets)
    extra_tensors = ((2 if model.positions == "learned" else 1) if first_stage else 0)
    if last_stage:
        extra_tensors += 0 if model.tie_word_embeddings and first_stage else 1
        extra_tensors += 2 if model.norm == "layer" else 1
    tensor_count = tensors_layers + layers * lora_tensors + extra_tensors + len(head_adapters)
    trainable_tensors = (layers * lora_tensors + len(head_adapters) if config.uses_lora
                         else tensors_layers + extra_tensors)

    all_linears = [linear for _count, linears in model.layer_groups(layers) for linear in linears]
    largest = max(
        [_linear_shard(linear, tp)[0] for linear in all_linears]
        + [model.vocab_size * model.hidden_size // tp]
    )
    if config.uses_lora and (targets or head_adapters):
        # Only adapters train: the largest trainable tensor is an A (r x in) or B (out x r) matrix.
        sharded = lora_tensor_parallel_shapes(config, model)
        largest = max(
            (max(_adapter_numels(config, linear, tp)) if sharded
             else config.lora_rank * max(linear.in_features, linear.out_features) // tp
             for linear in all_linears if linear.name in targets), default=0
        )
        largest = max([largest, *head_adapters])
    return ParamLayout(
        layers=layers,
        linear_weight_params=total_linear,
        linear_rows=linear_rows_total,
        expert_params=expert_total,
        other_params=other,
        lora_params=lora,
        trainable_params=trainable,
        largest_layer_params=largest_layer,
        largest_tensor_params=largest,
        tensor_count=tensor_count,
        trainable_tensor_count=trainable_tensors,
        embedding=first_stage,
        largest_layer_parts=largest_parts,
    )


def trainable_params_total(config: TrainingConfig, model: ModelSpec) -> int:
    """Trainable parameters of the whole model (all GPUs), for the summary."""
    if not config.uses_lora:
        return model.params
    targets = resolve_lora_targets(config, model)
    return (sum(count * _lora_params(config, linears, targets, 1) for count, linears in model.layer_groups())
            + sum(rows * columns for rows, columns in head_adapter_shapes(config, model)))


def trainable_tensor_numels(config: TrainingConfig, model: ModelSpec, *,
                            stage: tuple[int, bool, bool] | None = None) -> list[int]:
    """The sizes of every trainable parameter tensor on this GPU, as torch's modules hold them; `stage`: (layers,
    first, last) of one pipeline stage, the tensors of that stage's module (its own optimizer's)."""
    tp = config.tp
    layers = stage[0] if stage is not None else param_layout(config, model).layers
    numels: list[int] = []
    norm_tensors = [model.hidden_size] * (2 if model.norm == "layer" else 1)  # LayerNorm: weight and bias
    for count, linears in model.layer_groups(layers):
        if config.uses_lora and config.modeling == "litgpt":
            numels += litgpt_adapter_numels(config, linears, resolve_lora_targets(config, model)) * count
            continue
        if config.uses_lora:
            per_layer = []
            for name in resolve_lora_targets(config, model):
                linear = _named(linears, name)
                per_layer += (list(_adapter_numels(config, linear, tp)) if lora_tensor_parallel_shapes(config, model)
                              else [config.lora_rank * linear.in_features // tp,
                                    linear.out_features * config.lora_rank // tp])
            numels += per_layer * count
            continue
        per_layer = [_linear_shard(linear, tp)[0] for linear in linears]
        per_layer += [_bias_shard(linear, tp) for linear in linears if linear.bias]
        per_layer += norm_tensors * model.norms_per_layer
        per_layer += [width for width in model.qk_norm_widths if width] if model.qk_norm else []
        per_layer += [model.router_params] if any(linear.experts > 1 for linear in linears) else []
        per_layer += list(_layer_vectors(model, tp))
        numels += per_layer * count
    if config.uses_lora:
        return numels + [rows * columns for rows, columns in head_adapter_shapes(config, model)]
    first, last = stage[1:] if stage is not None else (config.pp == 1, config.pp == 1)
    if first:
        numels.append(model.vocab_size * model.hidden_size // tp)
        if model.positions == "learned":
            numels.append(model.max_position_embeddings * model.hidden_size)
    if last:
        if not first:  # a last stage without the embedding holds its own head, tied or not
            numels.append(model.vocab_size * model.hidden_size // tp)
        elif model.head_params:
            numels.append(model.head_params // tp)
        numels += norm_tensors
    return numels


def zero_redundancy_largest_share(numels: list[int], ranks: int) -> int:
    """The most elements any rank holds under torch's ZeroRedundancyOptimizer: tensors whole, largest first,
    each to the rank holding the fewest so far (`_partition_parameters`)."""
    sizes = [0] * ranks
    for numel in sorted(numels, reverse=True):
        rank = sizes.index(min(sizes))
        sizes[rank] += numel
    return max(sizes)


# transformers' Llama-layout families: separate q/k/v and gate/up projections under the same module names, which
# torchtitan's tensor-parallel plan for Llama names (memtui.engine.trace.tensor_parallel applies it).
LLAMA_LAYOUT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
# Mixture-of-experts families whose blocks memtui.engine.trace.moe_parallel shards as torchtitan does (TP without
# expert parallelism: the router replicated, the experts' stacked weights on their intermediate dimension; gpt-oss's
# sinks with the heads; DeepSeek-V3's shared experts and latent attention as its DeepSeek-V3 plan).
MOE_TENSOR_PARALLEL_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3")
# The same plan with Phi-3's fused qkv_proj and gate_up_proj sharded per part, as Megatron-LM and vLLM shard them,
# and OLMo 2's whole-width q/k norms run on the sequence, as OLMo-core's plan runs them; GPT-2 by Megatron-LM's GPT
# plan on its Conv1D layers (memtui.engine.trace.tensor_parallel_gpt2).
TENSOR_PARALLEL_FAMILIES = (*LLAMA_LAYOUT_FAMILIES, "phi3", "olmo2", "gpt2", *MOE_TENSOR_PARALLEL_FAMILIES)
# peft's LoRA beside the plan, by NeMo Automodel's LoRA-aware Colwise and Rowwise styles (the adapters sharded with
# their base layers, the norms kept frozen; memtui.engine.trace.tensor_parallel_lora), on every family of the plan:
# Phi-3's and GPT-2's fused lora_B rows reordered per part as their base weights are, OLMo 2's whole-width q/k norms
# and DeepSeek-V3's replicated (NoParallel) modules kept frozen, the MoE experts' stacked weights not adapted.
LORA_TENSOR_PARALLEL_FAMILIES = TENSOR_PARALLEL_FAMILIES
# Phi-3 and OLMo 2 are cut as the Llama layout is (model.layers); GPT-2's transformer.h likewise, its token and
# position embeddings on the first stage (Megatron-LM's pre_process), ln_f and the head on the last.
PIPELINE_FAMILIES = (*LLAMA_LAYOUT_FAMILIES, "phi3", "olmo2", "gpt2", *MOE_TENSOR_PARALLEL_FAMILIES)


def zero_offload_refusal(config: TrainingConfig) -> str | None:
    """Why memtui's stand-in of DeepSpeed's ZeRO-Offload (memtui.engine.trace.zero_offload: ZeRO-1 and 2 as
    DeepSpeedZeroOptimizer runs them, data parallelism alone or one GPU) cannot trace this configuration, or None."""
    # Validation refuses it beside tensor or pipeline parallelism and with the optimizer in backward (ZeRO >= 1).
    if config.zero not in (1, 2):
        return ("DeepSpeed's ZeRO-Offload under ZeRO-3 (stage3.py's parameter partitioning and prefetching) is "
                "modelled, not traced")
    if (config.precision == "16-mixed" or config.compile or config.quant != "none"
            or config.optimizer not in ("adamw", "lion")):
        return ("DeepSpeed's ZeRO-Offload is traced with AdamW or Lion (DeepSpeedCPUAdam, DeepSpeedCPULion: the "
                "optimizers of memtui's it supports), without fp16 autocast (16-mixed: DeepSpeed's torch_autocast, a "
                "bucket per communication dtype and torch's GradScaler), --compile or quantization")
    return None


def cpu_offload_refusal(config: TrainingConfig) -> str | None:
    """Why `--offload` here is not FSDP2's CPUOffloadPolicy as the trace runs it (torchtitan's enable_cpu_offload:
    fully_shard(..., offload_policy=CPUOffloadPolicy()) on every model part, beside TP and PP too), or None."""
    if config.deepspeed_offload:
        return ("--offload optimizer, offloading beside DDP and offloading without data-parallel shards are DeepSpeed's "
                "ZeRO-Offload (the optimizer states and step on the CPU), which PyTorch's DDP and FSDP2 have no policy for")
    if config.optimizer_in_backward:
        return ("the optimizer in backward under CPUOffloadPolicy (each gradient stepped on the CPU in backward) is "
                "not traced")
    return None


def tensor_parallel_refusal(config: TrainingConfig, model: ModelSpec) -> str | None:
    """Why `memtui trace` cannot run this configuration's tensor-parallel program (it is then modelled), or None:
    the estimator's terms for DTensor's sequence-parallel plan apply exactly when it can. Layouts no stack runs
    (tp not dividing the key/value heads, quantized weights, DDP beside TP with LoRA, experts or a tied embedding)
    are refused before this by memtui.engine.model.validation."""
    if config.tp == 1:
        return "no tensor parallelism"
    if config.pp > 1 and (pipeline := pipeline_refusal(config, model)) is not None:
        return f"pipeline parallelism here is not traced ({pipeline})"
    if model.family not in TENSOR_PARALLEL_FAMILIES:
        return (f"the {model.family} family has no traced tensor-parallel plan (Llama-layout families, Phi-3, "
                "OLMo 2, GPT-2 and the MoE families only)")
    if config.offload != "none" and (offload := cpu_offload_refusal(config)) is not None:
        return f"offloading under tensor parallelism: {offload}"
    return None


def tensor_parallel_whole_vocabulary_gradient(config: TrainingConfig, model: ModelSpec) -> int:
    """Bytes of the embedding gradient DTensor's RowwiseParallel embedding backward (embedding_dense_backward)
    makes under the traced plan: the whole vocabulary's, not this rank's 1/tp. None under LoRA (frozen)."""
    if tensor_parallel_refusal(config, model) is not None or config.uses_lora:
        return 0
    return model.vocab_size * model.hidden_size * config.weight_bytes


def tensor_parallel_vocabulary_slice(config: TrainingConfig, model: ModelSpec) -> int:
    """Bytes of this rank's Shard(0) slice of the embedding gradient (vocab / tp rows)."""
    return model.vocab_size // config.tp * model.hidden_size * config.weight_bytes


def ddp_tensor_parallel_embedding_gradients(config: TrainingConfig, model: ModelSpec) -> tuple[int, int]:
    """(the whole vocabulary's, this rank's slice) bytes of the embedding gradient under DDP or ZeRO-1 beside the
    traced plan (PyTorch's _pre_dp_module_transform): the embedding's backward makes the whole one, and the rank's
    Shard(0) slice is cloned out of it (or added in place). (0, 0) elsewhere."""
    whole = tensor_parallel_whole_vocabulary_gradient(config, model) if config.dp > 1 and config.zero <= 1 else 0
    return whole, (tensor_parallel_vocabulary_slice(config, model) if whole else 0)


def tensor_parallel_embedding_gradient_extra(config: TrainingConfig, model: ModelSpec) -> int:
    """Bytes of embedding gradient beyond this rank's 1/tp, under the traced plan without FSDP2: the rank's
    Shard(0) gradient keeps the whole vocabulary's (traced: Llama-3.1-8B at tp 2 and 4 holds vocab x hidden
    fp32). With FSDP2 the rank's slice is cloned out of it, and the whole one freed."""
    if config.dp > 1 or not tensor_parallel_whole_vocabulary_gradient(config, model):
        return 0
    vocab = model.vocab_size
    return (vocab - vocab // config.tp) * model.hidden_size * config.weight_bytes


# ---- pipeline parallelism (issue 13) ---------------------------------------------------------------------------
def pipeline_stage_layers(num_layers: int, stages: int) -> list[int]:
    """Decoder layers of each pipeline stage: an even split, the first stages taking one more where it is not even."""
    base, extra = divmod(num_layers, stages)
    return [base + (1 if stage < extra else 0) for stage in range(stages)]


def pipeline_rank_stages(config: TrainingConfig) -> list[list[int]]:
    """The stage indices each pipeline rank runs: rank r runs stage r, and under interleaved 1F1B also stage
    r + pp (torch's looped placement, which ScheduleInterleaved1F1B expects)."""
    return [[rank + config.pp * virtual for virtual in range(config.virtual_stages)] for rank in range(config.pp)]


def pipeline_stages_model(config: TrainingConfig, model: ModelSpec, indices: list[int]) -> ModelSpec:
    """The model as these pipeline stages hold it: DeepSeek-V3's leading dense layers counted among the stages'
    own layers (a stage keeps each layer's kind, as torchtitan's split does: the dense ones on the first stages),
    and the attention kinds of Gemma-2, Gemma 3 and gpt-oss cut to the stages' layers (layer_types).
    The model itself where its layers are all of one kind."""
    kinds = attention_layer_types(model)
    if not model.dense_layers and not kinds:
        return model
    split = pipeline_stage_layers(model.num_layers, config.pp * config.virtual_stages)
    update: dict = {}
    if model.dense_layers:
        update["dense_layers"] = sum(min(max(model.dense_layers - sum(split[:index]), 0), split[index])
                                     for index in indices)
    if kinds:
        update["config"] = {**model.config, "layer_types": [
            kind for index in indices for kind in kinds[sum(split[:index]):sum(split[:index + 1])]]}
    return model.model_copy(update=update)


def pipeline_refusal(config: TrainingConfig, model: ModelSpec) -> str | None:
    """Why `memtui trace` cannot run this configuration's pipeline program (it is then modelled), or None. Layouts
    no stack runs (the router's load-balancing loss across stages, the optimizer in backward, LitGPT's loss, the
    fused loss beside ZeRO-3, the tensor-parallel plan's own refusals) are refused before this by
    memtui.engine.model.validation."""
    if config.pp == 1:
        return "no pipeline parallelism"
    if model.family not in PIPELINE_FAMILIES:
        return (f"the {model.family} family has no traced pipeline split (Llama-layout families, Phi-3, OLMo 2, "
                "GPT-2 and the MoE families only)")
    if config.offload != "none" and (offload := cpu_offload_refusal(config)) is not None:
        return f"offloading under pipeline parallelism: {offload}"
    return None
