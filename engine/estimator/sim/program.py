"""Replay one training step of a model and extend it from one decoder layer to L.

We replay embedding, one decoder layer, the head and the loss, then backward,
and tag every tensor with the segment that made it and the segment that freed
it. Decoder layers are identical, so the other L-1 layers follow exactly:
while layer k runs forward, layers 0..k-1 hold what they keep past their own
forward; after the forward, what they keep until backward; a layer done with
backward leaves its parameter gradients behind. Each candidate peak of the
replay becomes a candidate of the L-layer step; the largest wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from math import fsum

from memtui.engine.model.architectures import EAGER_ONLY_FAMILIES, GEMMA_FAMILIES, ModelSpec, attention_layer_types
from memtui.engine.estimator.sim import litgpt, ops
from memtui.engine.estimator.sim.core import (
    ABOVE_LOWEST_MIDDLE,
    BEFORE_LAYERS_BACKWARD,
    CATEGORIES,
    LF,
    LAYER_BACKWARD_STARTS,
    HEAD_GATHER,
    LOWEST_LAYER_GATHER,
    ZERO,
    Sim,
    Tensor,
    const,
    lf_add,
    lf_scale,
    per_position,
    per_position_sq,
    per_token,
    per_token_seq,
)
from memtui.engine.estimator.sim.families import (
    Dims,
    Options,
    gpt2_layer,
    gpt2_layer_params,
    llama_layer,
    llama_layer_params,
    fused_linear_chunk_rows,
    gather_tokens,
    lora_branch,
    norm_weight,
    chain,
    rms_norm,
    rotary,
    softcap,
)
from memtui.engine.estimator.sim.compiled import compiled_layer
from memtui.engine.estimator.sim.deepseek import deepseek_layer, deepseek_layer_params, latent_dims
from memtui.engine.estimator.layout import tensor_parallel_refusal, zero_offload_refusal
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import adapts_head, litgpt_targets, resolve_lora_targets, unmodelled_compile

GRAPH_FREED = "graph_freed"  # the loss dropped after backward: the graph goes, with what its ctx attributes kept
FORWARD_SEGMENTS = ("inputs", "embed_fwd", "layer_fwd", "head_fwd")
_BACKWARD_OF = {
    "embed_fwd": "embed_bwd", "first_fwd": "first_bwd", "mid_fwd": "mid_bwd", "last_fwd": "last_bwd", "head_fwd": "head_bwd",
    "loss_fwd": "loss_bwd",
}


@dataclass(frozen=True)
class StepCandidate:
    phase: str  # forward | loss | backward
    live: dict[str, LF]  # by category, for the whole L-layer model on this GPU
    segment: str = ""  # where in the step (embed_fwd, first_fwd, mid_fwd, last_fwd, head_fwd, ...): FSDP2's gathers
    buffered: LF = ZERO  # --optimizer-in-backward: of the temporaries, gradients summing in an input buffer
    stepped: LF = ZERO  # --optimizer-in-backward, at GRAD_READY: of the gradients, those the hooks step there


@dataclass(frozen=True)
class StepProgram:
    candidates: tuple[StepCandidate, ...]
    gradients_end: LF  # parameter gradients after backward (all layers)
    layer_saved: LF  # activations one layer keeps for backward
    layer_gradients: LF  # parameter gradients one layer leaves
    logits_bytes: LF
    offloaded_bytes: LF = ZERO  # --activation-offload: host (pinned) bytes alive at the end of the forward
    # What one (micro-)batch holds from its forward (and loss) to its backward, beyond weights and gradients: the
    # pipeline schedules hold this for every micro-batch in flight.
    held_after_forward: LF = ZERO
    # Each candidate flat: (phase, the weights' five coefficients, the gradients', the activations', the
    # temporaries'), what an estimate at a new shape evaluates.
    rows: tuple[tuple, ...] = ()
    segments: tuple[str, ...] = ()  # where each row's candidate is (StepCandidate.segment)


def program_shape(config: TrainingConfig, spec: ModelSpec) -> tuple[bool, bool, int, tuple[float, float]]:
    """What of the step's program depends on the batch size and sequence length (options_for's `batched`,
    `window_mask`, `loss_chunk_rows`, `offload_point`): two shapes that agree on these, at one option set, replay
    the same program (its forms then differ only in the values they are evaluated at)."""
    tokens = config.batch_size * config.seq_len
    return (
        # only Phi-3, the chunked head and eager attention depend on it (keeps the cache small)
        config.batch_size > 1 and (spec.family == "phi3" or config.loss == "chunked"
                                   or config.attention == "eager" or spec.family in EAGER_ONLY_FAMILIES),
        _window_mask(config, spec),
        fused_linear_chunk_rows(tokens, spec.vocab_size // config.tp, spec.hidden_size)
        if config.loss == "fused-linear" else 0,
        (float(min(tokens, 1024)), float(min(config.seq_len, 1024))) if config.activation_offload else (0.0, 0.0),
    )


def options_for(config: TrainingConfig, spec: ModelSpec) -> Options:
    batched, window_mask, loss_chunk_rows, offload_point = program_shape(config, spec)
    compute = {"32-true": "f32", "16-mixed": "f16", "bf16-mixed": "bf16", "16-true": "f16", "bf16-true": "bf16"}[config.precision]
    # FSDP2 with MixedPrecisionPolicy(param_dtype) hands the layers bf16 parameters: they compute as bf16-true's.
    params = compute if config.precision in ("16-true", "bf16-true") or config.fsdp_casts else "f32"
    base = compute if config.quant != "none" and config.precision != "32-true" else params
    if config.kbit_prep:
        base = "f32"  # prepare_model_for_kbit_training: every 16-bit parameter that is not 4-bit becomes fp32
    gpt2 = spec.family == "gpt2"
    softcapped = spec.family in ("gemma2", "gemma3")
    litgpt = config.modeling == "litgpt"
    targets = resolve_lora_targets(config, spec)
    return Options(
        family=spec.family,
        compute=compute,
        params=params,
        base=base,
        autocast=config.autocast,
        attention="eager" if spec.family in EAGER_ONLY_FAMILIES else config.attention,
        checkpointing=config.checkpointing,
        lora_rank=config.lora_rank,
        lora_targets=litgpt_targets(targets) if litgpt else targets,
        lora_dtype={"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[config.adapter_dtype],
        lora_dropout=config.lora_dropout if config.uses_lora else 0.0,
        lora_head=adapts_head(config),
        bnb_legacy=config.bnb_version == "legacy" and config.quant == "nf4",
        quant=config.quant,
        tied=spec.tie_word_embeddings,
        qkv_bias=spec.linears[0].bias,
        o_bias=any(linear.name == "o_proj" and linear.bias for linear in spec.linears),
        mlp_bias=any(linear.name in ("gate_proj", "down_proj") and linear.bias for linear in spec.linears),
        attention_dropout=float(spec.config.get("attn_pdrop", spec.config.get("attention_dropout", 0.0)) or 0.0) if gpt2 else 0.0,
        residual_dropout=float(spec.config.get("resid_pdrop", 0.0) or 0.0) if gpt2 else 0.0,
        eager_softmax_f32=not gpt2,
        embedding_dropout=float(spec.config.get("embd_pdrop", 0.0) or 0.0) if gpt2 else 0.0,
        batched=batched,
        window_mask=window_mask and not litgpt,  # LitGPT builds its window masks in each layer
        # Gemma3Attention passes no softcap to its attention function: only Gemma-2 caps the scores.
        attention_softcap=spec.family == "gemma2" and spec.config.get("attn_logit_softcapping") is not None,
        logit_softcap=softcapped and spec.config.get("final_logit_softcapping") is not None,
        rope_pairs=len(set(gemma3_layer_types(spec))) if spec.family == "gemma3" else 1,
        # transformers' defaults when the key is absent: DeepseekV3Config true, Qwen3MoeConfig false
        norm_topk=bool(spec.config.get("norm_topk_prob", spec.family == "deepseek_v3")),
        full_layer_share=_full_layer_share(spec, window_mask),
        last_layer_full=_last_layer_full(spec, window_mask),
        first_layer_full=_first_layer_full(spec, window_mask),
        dense_layers=spec.dense_layers,
        loss=config.loss,
        loss_chunks=config.loss_chunks if config.loss == "chunked" else 8,
        loss_dtype=config.loss_dtype if config.loss == "chunked" else "fp32",
        logits_upcast=config.logits_upcast,
        compiled_loss=config.compile and not config.eager_loss and not unmodelled_compile(config, spec),
        sequence_parallel=config.tp if tensor_parallel_refusal(config, spec) is None else 1,
        loss_chunk_rows=loss_chunk_rows,
        activation_offload=config.activation_offload,
        compiled=config.compile and not unmodelled_compile(config, spec),
        offload_point=offload_point,
        # DeepSpeed's ZeRO-Offload works in its post-accumulate-grad hooks (the bucket made by the first, ZeRO-2's
        # reductions): the moments they run at, too
        step_in_backward=(config.optimizer_in_backward or (config.deepspeed_offload
                                                           and zero_offload_refusal(config) is None)) and config.pp == 1,
        float8=config.float8 != "off",
        litgpt=litgpt,
        litgpt_window=litgpt and bool(spec.config.get("sliding_window")),
    )


def _window_mask(config: TrainingConfig, spec: ModelSpec) -> bool:
    """Phi-3 (and Gemma 3's sliding layers) with SDPA past the sliding window: transformers builds an explicit
    (b, 1, s, s) boolean mask (Gemma 3 from a sequence as long as the window: masking_utils'
    `kv_length >= local_attention_size`)."""
    window = spec.config.get("sliding_window")
    if config.attention != "flash" or not window:
        return False
    if spec.family == "gemma3":
        return config.seq_len >= int(window) and "sliding_attention" in gemma3_layer_types(spec)
    return spec.family == "phi3" and config.seq_len > int(window)


def _full_layer_share(spec: ModelSpec, window_mask: bool) -> float:
    """Gemma 3 under a sliding-window mask: the full-attention layers' share of the layers between the first and
    the last (those the replayed middle layer stands for)."""
    if spec.family != "gemma3" or not window_mask:
        return 0.0
    middle = gemma3_layer_types(spec)[1:-1]
    return middle.count("full_attention") / len(middle) if middle else 0.0


def _first_layer_full(spec: ModelSpec, window_mask: bool) -> bool:
    """Gemma 3 under a sliding-window mask whose first layer is a full-attention one (a pipeline stage's can be:
    gemma-3-4b's second of two begins at its 18th layer)."""
    return (spec.family == "gemma3" and window_mask
            and gemma3_layer_types(spec)[0] == "full_attention")


def _last_layer_full(spec: ModelSpec, window_mask: bool) -> bool:
    """Gemma 3 under a sliding-window mask whose last layer is a full-attention one (gemma-3-12b's 48th)."""
    return (spec.family == "gemma3" and window_mask
            and gemma3_layer_types(spec)[-1] == "full_attention")


def gemma3_layer_types(spec: ModelSpec) -> list[str]:
    """Gemma3TextConfig's layer_types: given, or every sliding_window_pattern-th layer full attention (a pipeline
    stage's: its own layers', memtui.engine.estimator.layout.pipeline_stages_model)."""
    return attention_layer_types(spec)


def dims_for(spec: ModelSpec, tp: int = 1) -> Dims:
    return Dims(
        hidden=spec.hidden_size,
        q_dim=spec.q_dim // tp,
        kv_dim=max(spec.kv_dim // tp, spec.head_dim),
        heads=spec.num_heads // tp,
        kv_heads=max(spec.num_kv_heads // tp, 1),
        head_dim=spec.head_dim,
        intermediate=spec.intermediate_size // tp,
        vocab=spec.vocab_size // tp,
        experts=spec.num_experts,
        positions=int(spec.config.get("n_positions", 0) or 0) if spec.family == "gpt2" else 0,
        top_k=spec.experts_per_token,
        latent=latent_dims(spec, tp) if spec.family == "deepseek_v3" else None,
    )


def _layer_segments(layers: int, every_layer: bool = False) -> list[str]:
    """Replay the first layer, one middle layer standing for all of them, and the last layer (`every_layer`:
    each middle layer, for the allocation sequence)."""
    if every_layer and layers > 3:
        # Each middle layer named apart (mid, mid2, mid3, ...): the allocation program labels every event with its layer.
        return ["first", "mid"] + [f"mid{index}" for index in range(2, layers - 1)] + ["last"]
    if every_layer and layers == 3:
        return ["first", "mid", "last"]
    if layers == 1:
        return ["first"]
    if layers == 2:
        return ["first", "last"]
    return ["first", "mid", "last"]


def _replay(d: Dims, opts: Options, *, layers: int = 3, log: bool = False, every_layer: bool = False,
            segments: list[str] | None = None, first: bool = True, last: bool = True,
            accumulating: bool = False, layer_starts: bool = False) -> Sim:
    """The step of one GPU; `first` / `last` False: a pipeline stage without the embedding / without the final
    norm, head and loss (memtui.engine.trace.pipeline's stage: hidden states in, hidden states out, the output's
    gradient received into a buffer of its size); `accumulating`: a candidate before each parameter gradient
    reaches AccumulateGrad (see Sim.accumulate); `layer_starts`: see Sim.layer_starts."""
    sim = Sim(autocast_dtype=opts.compute if opts.autocast else None)
    sim.step_in_backward = opts.step_in_backward
    sim.accumulating = accumulating
    sim.layer_starts = layer_starts
    if log:
        sim.log = []
    frozen = opts.lora_rank > 0
    embed_dtype = opts.base if frozen else opts.params
    embed = (sim.parameter((float(d.vocab * d.hidden), 0, 0, 0, 0), embed_dtype, name="embed_tokens",
                           trainable=not frozen) if first else None)
    segments = segments or _layer_segments(layers, every_layer)
    gpt2 = opts.family == "gpt2"
    make_params = gpt2_layer_params if gpt2 else litgpt.litgpt_layer_params if opts.litgpt else llama_layer_params
    dense = _dense_segments(segments, layers, opts.dense_layers)
    layer_params = []
    sim.layer_parameters = []  # type: ignore[attr-defined]  # (first, end) of each layer's in sim.parameters
    for index, _segment in enumerate(segments):
        start = len(sim.parameters)
        if opts.family == "deepseek_v3":
            layer_params.append(deepseek_layer_params(sim, d, opts, dense=dense[index]))
        else:
            layer_params.append(make_params(sim, d, opts))
        sim.layer_parameters.append((start, len(sim.parameters)))  # type: ignore[attr-defined]
    final_norm = norm_weight(sim, d.hidden, opts, "norm")
    final_norm_bias = norm_weight(sim, d.hidden, opts, "norm.bias") if gpt2 else None
    # GPT-2's position embedding is the first pipeline stage's, with the token embedding (Megatron-LM's pre_process)
    positions = (sim.parameter(const(d.positions * d.hidden), embed_dtype, name="wpe", trainable=not frozen)
                 if gpt2 and first else None)
    if opts.tied and embed is not None:
        head = embed
    else:  # untied, or a last pipeline stage: its own head (a tied one is the stage's copy of the embedding)
        head = sim.parameter((float(d.vocab * d.hidden), 0, 0, 0, 0), embed_dtype, name="lm_head", trainable=not frozen)
    # peft's LoRA on lm_head: its adapters follow the head's parameters (tied or not, the adapters are its own).
    head_adapters = (sim.parameter(const(d.hidden * opts.lora_rank), opts.lora_dtype, name="lm_head.lora_A", trainable=True),
                     sim.parameter(const(opts.lora_rank * d.vocab), opts.lora_dtype, name="lm_head.lora_B", trainable=True)
                     ) if opts.lora_head else None

    sim.set_segment("inputs")
    # labels are the same tensor; a middle pipeline stage has neither
    ids = sim.new(per_token(1), "i64", name="input_ids") if first or last else None

    sim.set_segment("embed_fwd")
    if opts.activation_offload:  # torchtune's OffloadActivations around the decoder (not the head or the loss)
        tokens, seq = opts.offload_point
        sim.offload_at = (1.0, tokens, tokens * seq, seq, seq * seq)
    if embed is not None:
        x = ops.embedding(sim, embed, ids, d.hidden)
    else:  # PipelineStage's receive buffer (_make_tensor_from_meta), made a leaf that requires grad; under sequence
        # parallelism the stage before sends this rank's 1/tp of the tokens (its last layer's Shard(1) output)
        x = sim.new(lf_scale(per_token(d.hidden), 1 / opts.sequence_parallel), embed_dtype,
                    name="received hidden states", requires_grad=True)
        x.leaf = True
    received = sim.ref(x) if embed is None else None  # _ForwardChunkState keeps the stage's inputs until backward
    # A last pipeline stage under LoRA: its head has no gradient, so where FSDP2 gathers the root group again (the
    # head's pre-backward, the logits' gradient made) no later candidate holds as much
    sim.head_gather = received is not None and last and frozen
    if opts.family == "gemma3" and embed is not None:
        # Gemma3TextScaledWordEmbedding scales inside the module: its output (what peft's input hook marks) is scaled
        # (a later pipeline stage's received hidden states are not).
        x = chain(sim, x, ops.mul_scalar)
    if opts.lora_rank > 0 and opts.checkpointing != "none":
        # peft on a gradient-checkpointing model calls enable_input_require_grads: the frozen
        # embedding's output requires grad, so what follows it (GPT-2's dropout) saves for backward. Its hook runs
        # before DTensor's output redistribution: under sequence parallelism the leaf is the whole sequence's.
        x.requires_grad = True
        input_leaf = sim.ref(x)  # a leaf that requires grad: autograd's graph holds it until backward is done
    else:
        input_leaf = None
    if opts.sequence_parallel > 1 and embed is not None and gpt2:
        # Megatron-LM with learned positions: the word embeddings all-reduced (RowwiseParallel(output Replicate)),
        # scattered onto the sequence only after the position embeddings are added
        reduced = ops.all_reduce(sim, x)
        sim.drop(x)
        x = reduced
    elif opts.sequence_parallel > 1 and embed is not None:  # RowwiseParallel(output Shard(1)): reduce-scattered
        scattered = ops.reduce_scatter_tokens(sim, x, opts.sequence_parallel)
        sim.drop(x)
        x = scattered
    # The model's forward keeps its inputs_embeds (the embedding's output, or the hidden states handed to a later
    # pipeline stage) referenced until it returns, past the first layer that consumes them.
    model_locals = [sim.ref(x)]
    if gpt2 and embed is not None:
        # GPT2Model: wte(ids) + wpe(arange(s)), then the embedding dropout.
        position_ids = sim.new(per_position(1), "i64", name="position_ids")
        position_embeds = ops.embedding(sim, positions, position_ids, d.hidden)
        summed = ops.add(sim, x, position_embeds)
        model_locals += [position_embeds, position_ids]  # GPT2Model.forward's locals too
        sim.drop(x)
        if opts.sequence_parallel > 1:  # the dropout's input redistributed Replicate -> Shard(1): a chunk cloned
            x = ops.split_tokens(sim, summed, opts.sequence_parallel)
            x = chain(sim, x, lambda sim_, t: ops.dropout(sim_, t, opts.embedding_dropout))
        else:
            x = ops.dropout(sim, summed, opts.embedding_dropout)
        sim.drop(summed)
    if opts.family in ("gemma", "gemma2") and embed is not None:  # the first pipeline stage's
        scaled = ops.mul_scalar(sim, x)  # embeddings * sqrt(hidden)
        sim.drop(x)
        x = scaled
    mask = causal_mask(sim, opts, x.dtype)
    if opts.window_mask:
        mask = sliding_window_mask(sim, per_sequence=opts.family != "gemma3")
        sim.window_mask = mask  # type: ignore[attr-defined]
    # Gemma-2, Gemma 3 and gpt-oss alternate full and sliding-window layers: eager attention gets a mask for each kind.
    alternating = opts.family in ("gemma2", "gemma3", "gpt_oss")
    second_mask = causal_mask(sim, opts, x.dtype) if alternating and mask is not None else None
    if second_mask is not None:
        sim.causal_mask = mask  # type: ignore[attr-defined]
    # OLMo 2's rotary embedding returns fp32 cos and sin (no cast to the hidden states' dtype).
    rotary_dims = replace(d, head_dim=d.latent.rope) if d.latent is not None else d  # DeepSeek: the rotary part
    # LitGPT's cos and sin are fp32 buffers (litgpt/model.py build_rope_cache), sliced per forward.
    cos, sin = (None, None) if gpt2 else rotary(sim, rotary_dims, "f32" if opts.family == "olmo2" or opts.litgpt else x.dtype,
                                                 d.head_dim // 2 if opts.family == "gpt_oss" else 0)
    # Gemma 3: a second (cos, sin) pair for the other kind of layer; the replayed layers use the first, and the
    # layers of the other kind keep the second for their backward (freed with the last of them: the step's end).
    other_pair = rotary(sim, d, x.dtype) if opts.rope_pairs > 1 else ()

    # Gemma 3's replayed layers are sliding-window ones; where the model's (or the stage's) last or first layer is a
    # full-attention one, the replayed one is too (its SDPA gets no mask, so no repeat_kv copies).
    full = replace(opts, full_attention_layers=True)
    edge_opts = {"last": full if opts.last_layer_full else opts,
                 "first": full if opts.first_layer_full else opts}

    def run_layer(hidden: Tensor, layer, sim: Sim = sim, layer_opts: Options = opts) -> Tensor:
        if opts.compiled and sim is outer_sim:
            return compiled_layer(sim, lambda recorder, h: run_layer(h, layer, recorder, layer_opts), hidden,
                                  policy="selective-op" if in_graph_checkpoint else "")
        if gpt2:
            return gpt2_layer(sim, hidden, layer, d, opts)
        if opts.family == "deepseek_v3":
            return deepseek_layer(sim, hidden, layer, d, opts, cos, sin, dense=dense[[id(one) for one in layer_params].index(id(layer))])
        if opts.litgpt:
            return litgpt.layer(sim, hidden, layer, d, layer_opts, cos, sin)
        return llama_layer(sim, hidden, layer, d, layer_opts, cos, sin)

    outer_sim = sim
    # torchtitan compiles each checkpoint-wrapped block: its op-level policy is traced into the layer's graph
    in_graph_checkpoint = opts.compiled and opts.checkpointing == "selective-op"

    # Layer 0 differs (with a frozen embedding its input needs no gradient); the last layer's
    # output feeds the head, not a layer; the middle one stands for every other layer.
    out = x
    holder_segment = opts.rope_holder or ("mid" if "mid" in segments else segments[-1])
    mask_saved = False  # a compiled layer saved its attention mask for backward
    # layers of the other kind exist (Gemma 3's may all be sliding-window ones: one kind of rotary pair)
    other_kind = second_mask is not None and (opts.family != "gemma3" or opts.rope_pairs > 1)
    for segment, layer in zip(segments, layer_params):
        sim.set_segment(f"{segment}_fwd")
        previous = out
        layer_opts = edge_opts.get(segment, opts)
        if other_pair and segment == holder_segment:
            # The other kind's layers save the second pair for backward; the lowest of them (layer 5 of 6) is done
            # before the bottom layers' backward, so the pair is held until the middle layers' backward ends.
            holder = sim.alias(previous)
            sim.record("rope pair holder", holder, [previous], list(other_pair), lambda *_args: [])
            sim.drop(holder)
        if mask_saved and other_kind and segment == holder_segment:
            # Compiled layers that save their mask (the partitioner recomputes the scores past it in backward): the
            # other kind's layers save the other mask, held until the lowest of them (Gemma-2's layer 1) is done
            # backward, as the rotary pair above.
            holder = sim.alias(previous)
            sim.record("mask holder", holder, [previous], [second_mask], lambda *_args: [])
            sim.drop(holder)
        if opts.checkpointing != "none" and not in_graph_checkpoint:
            # transformers passes position embeddings and the mask as kwargs: the checkpoint frame keeps them.
            kept = [tensor for tensor in (cos, sin, mask) if tensor is not None]
            if opts.family == "gpt_oss" and second_mask is not None and segment == holder_segment:
                # The other kind's layers keep the other mask in their checkpoint frames until their backward:
                # the lowest of them (layer 1) is a middle layer.
                kept.append(second_mask)
            out = sim.checkpoint(lambda h, *_kept, layer=layer, kind=layer_opts: run_layer(h, layer, layer_opts=kind),
                                 previous, *kept, policy="" if opts.checkpointing == "full" else opts.checkpointing,
                                 positional=1)
        else:
            out = run_layer(previous, layer, layer_opts=layer_opts)
            # the compiled layer's node is the last recorded (its saved tensors: what the partitioner chose)
            mask_saved = mask_saved or (opts.compiled and mask is not None and bool(sim.nodes)
                                        and any(t is mask for t in sim.nodes[-1].saved))
        sim.drop(previous)

    if not last:
        _stage_output_backward(sim, out, (mask, second_mask, *model_locals), (cos, sin, *other_pair), segments,
                               received)
        sim.set_segment("end")
        sim.finish()
        return sim

    sim.set_segment("head_fwd")
    if gpt2:
        normed = ops.layer_norm(sim, out, final_norm, final_norm_bias, d.hidden)
    elif opts.litgpt:
        normed = litgpt.rms_norm(sim, out, final_norm, d.hidden)
    else:
        normed = rms_norm(sim, out, final_norm, d.hidden, gemma=opts.family in GEMMA_FAMILIES,
                          olmo=opts.family in ("olmo2", "gpt_oss"))
    sim.offload_at = None  # the decoder's forward ends: its offloading hooks are popped
    sim.drop(out, mask, second_mask, *model_locals)  # LlamaModel.forward returns: its causal masks and inputs go
    kept: list[Tensor] = []  # what the training loop keeps referenced through backward
    # A last pipeline stage: _ForwardChunkState keeps the stage's output (the logits, the chunked head's list, or
    # the fused loss's hidden states) until backward_one_chunk returns
    kept_output: list[Tensor] = []
    if opts.loss == "chunked" and opts.loss_dtype == "compute":
        loss, kept = litgpt_chunked_loss(sim, normed, head, ids, d, opts, head_adapters)
        sim.drop(normed)
    elif opts.loss == "chunked":
        loss, kept_output = chunked_output_loss(sim, normed, head, d, opts, head_adapters,
                                                stage_output=received is not None)
        sim.drop(normed)
    elif opts.loss == "fused-linear":
        loss = fused_linear_loss(sim, normed, head, d, opts)
        if received is not None:
            kept_output = [sim.ref(normed)]
        sim.drop(normed)
    else:
        head_input = gather_tokens(sim, normed, opts)  # ColwiseParallel(input Shard(1)): all-gathered
        logits = ops.linear(sim, head_input, head, d.vocab, d.hidden)
        if head_adapters is not None:
            logits = lora_branch(sim, head_input, logits, head_adapters, d.hidden, d.vocab, opts)
        sim.drop(head_input)
        if received is not None:
            # A last pipeline stage's forward returns the logits and the schedule's loss_fn runs after it: the final
            # norm's output goes with the forward's frame (on one GPU the causal LM's forward holds it through its loss)
            sim.drop(normed)
            normed = None
        if opts.logits_upcast == "model":
            # torchtune's self.output(h).float(): the head's output is a temporary (the cast's backward keeps
            # nothing), the model returns fp32 logits and the loss's own upcast is a no-op.
            upcast = ops.cast(sim, logits, "f32")
            sim.drop(logits)
            logits = upcast
        if opts.logit_softcap:
            logits = softcap(sim, logits)
        sim.set_segment("loss_fwd")  # the loss's own backward comes before the head's (FSDP2's root gather)
        if opts.compiled_loss:
            loss = compiled_layer(sim, lambda graph, x: cross_entropy_graph(graph, x, ids, d.vocab, shift=True), logits)
        else:
            loss = causal_lm_loss(sim, logits, ids, loss_parallel=opts.sequence_parallel > 1)
        if received is not None:
            kept_output = [sim.ref(logits)]
        sim.drop(logits, normed)  # the model output is dropped once .loss is read

    sim.set_segment("forward_end")
    sim.clear_autocast_cache()  # leaving autocast
    sim.drop(cos, sin, *other_pair)  # the model forward's references; layers' saved copies keep them (None for GPT-2)

    sim.held_after_forward = dict(sim.live)  # type: ignore[attr-defined]
    sim.phase = "backward"
    sim.segment_of_node = {**_BACKWARD_OF, **{f"{name}_fwd": f"{name}_bwd" for name in segments}}
    sim.run_backward(loss)
    sim.set_segment(GRAPH_FREED)
    sim.drop(loss, *kept)
    sim.free_graph()
    if input_leaf is not None:
        sim.drop(input_leaf)
    if received is not None:
        sim.drop(received.grad, received)  # the input's gradient, sent to the stage before
        received.grad = None
        sim.drop(*kept_output)  # backward_one_chunk's chunk state goes as it returns
    sim.set_segment("end")
    sim.finish()
    return sim


def _dense_segments(segments: list[str], layers: int, dense_layers: int) -> list[bool]:
    """Which replayed layers are DeepSeek-V3's leading dense ones: each layer when every one is replayed, else
    first (layer 0), last (layer L-1) and one middle layer standing for the others, an MoE one where any is."""
    if not dense_layers:
        return [False] * len(segments)
    if len(segments) == layers:
        return [index < dense_layers for index in range(layers)]
    index_of = {"first": 0, "mid": replayed_middle_layer(layers, dense_layers), "last": layers - 1}
    return [index_of[segment] < dense_layers for segment in segments]


def replayed_middle_layer(layers: int, dense_layers: int) -> int:
    """The layer whose kind the replayed middle layer has: the second, or DeepSeek-V3's first MoE layer among the
    middle ones where there is one."""
    middle = max(dense_layers, 1)
    return middle if middle <= layers - 2 else 1


def _stage_output_backward(sim: Sim, out: Tensor, forward_locals, positions, segments: list[str],
                           received: Tensor | None) -> None:
    """A pipeline stage before the last: the forward returns its hidden states (sent on, then released), the
    backward starts from the gradient received for them (a buffer of their size) and ends with the gradient of the
    stage's input, sent back."""
    sim.set_segment("forward_end")
    sim.offload_at = None
    sim.drop(*forward_locals)  # the model's forward returns: its masks and inputs go
    sim.clear_autocast_cache()
    sim.drop(*positions)
    sim.drop(out)  # released once its send completes; the autograd graph keeps what backward needs
    sim.held_after_forward = dict(sim.live)  # type: ignore[attr-defined]
    sim.phase = "backward"
    sim.segment_of_node = {**_BACKWARD_OF, **{f"{name}_fwd": f"{name}_bwd" for name in segments}}
    sim.set_segment("head_bwd")
    out.grad = sim.new(out.elems, out.dtype, name="received output gradient")
    # backward_one_chunk keeps the received gradient (its output_grads) referenced until it returns.
    received_gradient = sim.ref(out.grad)
    while sim.nodes:
        sim._run_node(sim.nodes.pop())
    sim.drop(received_gradient)
    if received is not None:
        sim.drop(received.grad, received)
        received.grad = None


def causal_mask(sim: Sim, opts: Options, dtype: str) -> Tensor | None:
    """Eager attention gets a (b, 1, s, s) additive mask in the embeddings' dtype; SDPA uses is_causal."""
    if opts.attention != "eager":
        sim.causal_mask = None  # type: ignore[attr-defined]
        return None
    allowed = sim.new(per_position_sq(1), "bool", name="mask le")
    mask = sim.new(per_token_seq(1), dtype, name="causal mask")
    sim.drop(allowed)
    sim.causal_mask = mask  # type: ignore[attr-defined]
    return mask


def sliding_window_mask(sim: Sim, *, per_sequence: bool = True) -> Tensor:
    """sdpa_mask with a window: (q > kv - window) & causal, built from two boolean (b, 1, s, s) passes
    (Gemma 3: (1, 1, s, s), expanded over the batch as a view)."""
    size = per_token_seq(1) if per_sequence else per_position_sq(1)
    outside = sim.new(size, "bool", name="window gt")
    windowed = sim.new(size, "bool", name="window and")
    sim.drop(outside)
    causal = sim.new(size, "bool", name="causal le")
    mask = sim.new(size, "bool", name="window mask")
    sim.drop(causal, windowed)
    return mask


def causal_lm_loss(sim: Sim, logits: Tensor, ids: Tensor, *, loss_parallel: bool = False) -> Tensor:
    """transformers' ForCausalLMLoss: upcast, shift labels, cross-entropy (log_softmax + nll_loss)."""
    upcast = ops.cast(sim, logits, "f32")
    shifted = shifted_labels(sim)
    logprobs = ops.log_softmax(sim, upcast, loss_parallel=loss_parallel)
    loss = ops.nll_loss(sim, logprobs, shifted)
    sim.drop(logprobs, shifted, upcast)
    return loss


def cross_entropy_graph(sim: Sim, logits: Tensor, target: Tensor, vocab: int, *, shift: bool) -> Tensor:
    """The loss as torch.compile traces it, for compiled_layer: inductor's decompositions of the upcast and
    cross-entropy (torchtune's compute_cross_entropy, sum; `shift`: transformers' ForCausalLMLoss, which pads and
    shifts the labels and takes the mean).

    log_softmax is x - amax - log(sum(exp(x - amax))), its backward reads only its output: with the row reductions
    never recomputed, the partitioner saves the logits (the graph's input, in the compute dtype), two fp32 values
    per row and the labels, not the fp32 log-probabilities; backward writes the logits' gradient in their dtype."""
    upcast = ops.cast(sim, logits, "f32")
    if shift:  # F.pad(labels, (0, 1))[..., 1:]: constant_pad_nd is not recomputable, the padded labels are saved
        padded = sim.new(per_token(1), "i64", name="labels padded")
        sim.record("pad", padded, [target], [], None)
        target = padded
    rows = lf_scale(logits.elems, 1 / vocab)
    # No gradient flows into the row reductions: log_softmax's backward is grad - exp(out) * sum(grad).
    top = sim.new(rows, "f32", name="amax")
    sim.record("amax", top, [], [], None)
    total = sim.new(rows, "f32", name="sum exp")
    sim.record("sum", total, [], [], None)
    logprobs = sim.new(upcast.elems, "f32", name="log_softmax")
    sim.record("log_softmax", logprobs, [upcast, top, total], [logprobs], None)
    loss = sim.new(const(1), "f32", name="nll_loss")
    sim.record("sum", loss, [logprobs], [target], None)  # a gather and a masked sum: fused, a reduction
    if not shift:
        return loss
    count = sim.new(const(1), "f32", name="valid count")  # mean: divided by the labels not ignored
    sim.record("sum", count, [target], [], None)
    mean = sim.new(const(1), "f32", name="mean loss")
    sim.record("div", mean, [loss, count], [count], None)
    return mean


def shifted_labels(sim: Sim) -> Tensor:
    """F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous(): the padded copy goes, the shifted one stays."""
    padded = sim.new(per_token(1), "i64", name="labels padded")
    shifted = sim.new(per_token(1), "i64", name="shift_labels")
    sim.drop(padded)
    return shifted


def chunked_output_loss(sim: Sim, normed: Tensor, head: Tensor, d: Dims, opts: Options,
                        head_adapters: tuple[Tensor, Tensor] | None = None,
                        stage_output: bool = False) -> tuple[Tensor, list[Tensor]]:
    """torchtune's chunked output and CEWithChunkedOutputLoss (build.chunked_output_loss).

    Alive together at the last chunk: every chunk's logits in the compute dtype (the model's list),
    every earlier chunk's fp32 log-probabilities (saved by nll_loss), and this chunk's fp32 upcast.
    `stage_output`: a last pipeline stage's, whose forward returns the list (the loss_fn shifts the labels after
    it) and keeps it until backward: returned, to be dropped then (else empty).
    """
    parts_count = opts.loss_chunks
    shifted = shifted_labels(sim) if not stage_output else None
    logits = chunked_head(sim, normed, head, d, opts, head_adapters)
    if stage_output:
        shifted = shifted_labels(sim)
    total = None
    for logit in logits:
        target = sim.new(lf_scale(shifted.elems, 1 / parts_count), "i64", name="target chunk") if opts.batched else None
        if opts.compiled_loss:  # torchtune compiles compute_cross_entropy: one graph per chunk
            chunk_loss = compiled_layer(sim, lambda graph, x, labels=target if target is not None else shifted:
                                        cross_entropy_graph(graph, x, labels, d.vocab, shift=False), logit)
            sim.drop(target)
        else:
            upcast = ops.cast(sim, logit, "f32")
            logprobs = ops.log_softmax(sim, upcast)
            sim.drop(upcast)
            chunk_loss = ops.nll_loss(sim, logprobs, target if target is not None else shifted)
            sim.drop(logprobs, target)
        if total is None:
            total = chunk_loss
        else:
            summed = ops.add(sim, total, chunk_loss)
            sim.drop(total, chunk_loss)
            total = summed
    kept = [sim.ref(logit) for logit in logits] if stage_output else []
    sim.drop(*logits)  # `del logits`: nothing in backward needs the compute-dtype chunks
    valid = sim.new(per_token(1), "bool", name="labels valid")
    count = sim.new(const(1), "i64", name="valid count")
    sim.drop(valid)
    loss = ops.mul_scalar(sim, total)  # / count
    sim.drop(total, count, shifted)
    return loss, kept


def chunked_head(sim: Sim, normed: Tensor, head: Tensor, d: Dims, opts: Options,
                 head_adapters: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """The head's output per sequence chunk, in the compute dtype: a list the caller holds."""
    # A sequence chunk of a (b, s, h) batch is not contiguous: linear's reshape copies it (kept for the
    # weight's gradient) unless autocast's cast already made a contiguous copy.
    copies = opts.batched and (sim.autocast_dtype is None or normed.dtype == sim.autocast_dtype)
    logits = []
    for part in ops.chunk(sim, normed, opts.loss_chunks):
        operand = ops.contiguous_copy(sim, part) if copies else sim.ref(part)
        logit = ops.linear(sim, operand, head, d.vocab, d.hidden)
        sim.drop(operand)
        if head_adapters is not None:  # peft's LoRA lm_head, called on each chunk
            logit = lora_branch(sim, part, logit, head_adapters, d.hidden, d.vocab, opts, strided=opts.batched)
        logits.append(logit)
        sim.drop(part)
    return logits


def _expand_backward_view(sim: Sim, node, grad):
    """SumBackward of a full reduction: the gradient expanded to the input's shape, a view."""
    return [(node.inputs[0], sim.alias(grad, node.inputs[0].elems))]


def litgpt_chunked_loss(sim: Sim, normed: Tensor, head: Tensor, ids: Tensor, d: Dims, opts: Options,
                        head_adapters: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """LitGPT's chunked head and chunked_cross_entropy, as its finetune loop runs them (build.litgpt_chunked_loss).

    No fp32 upcast: each chunk's log-probabilities are kept for backward in the logits' dtype (fp32 only where
    autocast runs log_softmax in fp32). The shift slices the last chunk of logits (its gradient is a zero-filled
    full chunk); with a batch above 1 that slice, and each chunk of the shifted targets, is copied by reshape.
    Per-token losses are concatenated and summed. The loop's `logits` list stays referenced through backward:
    returned to be dropped after it. The one position per sequence the slice leaves out is counted (b x vocab
    elements: not a linear form in the batch's tokens).
    """
    parts_count = opts.loss_chunks
    chunk_tokens = lf_scale(per_token(1), 1 / parts_count)
    logits = chunked_head(sim, normed, head, d, opts, head_adapters)
    last = ops.slice_view(sim, logits[-1], 1.0)  # logits[-1] = logits[-1][..., :-1, :]
    sim.drop(logits[-1])
    logits[-1] = last
    # [chunk.reshape(-1, vocab) for chunk in logits]: views, but the sliced last chunk of a batch is copied
    flat = [sim.ref(chunk) for chunk in logits[:-1]]
    flat.append(ops.contiguous_copy(sim, last) if opts.batched else sim.ref(last))
    # [chunk.reshape(-1) for chunk in targets[..., 1:].split(...)]: copies of a batch's non-contiguous chunks,
    # else views of the labels (the input ids here)
    targets = [sim.new(chunk_tokens, "i64", name="target chunk") if opts.batched else None for _ in logits]
    losses = []
    for chunk, target in zip(flat, targets):
        logprobs = ops.log_softmax(sim, chunk)
        losses.append(ops.nll_loss(sim, logprobs, target if target is not None else ids, elems=chunk_tokens))
        sim.drop(logprobs)
    valid = sim.new(per_token(1), "bool", name="targets valid")  # (targets != ignore_index).sum()
    count = sim.new(const(1), "i64", name="valid count")
    sim.drop(valid)
    ones = sim.new(const(1), "i64", name="ones_like")
    denominator = sim.new(const(1), "i64", name="maximum")
    sim.drop(ones)
    joined = sim.new(per_token(1), losses[0].dtype, name="cat")
    sim.record("cat", joined, losses, [], ops.cat_backward)
    sim.drop(*flat, *[target for target in targets if target is not None], *losses)
    summed = sim.new(const(1), joined.dtype, name="sum")
    sim.record("sum", summed, [joined], [], _expand_backward_view)
    sim.drop(joined)
    loss = ops.mul_scalar(sim, summed)  # / denominator
    sim.drop(summed, count, denominator)
    return loss, logits


def _fused_linear_backward(sim: Sim, node, grad):
    """Liger's backward hands on the gradients its forward computed."""
    return [(tensor, sim.ref(saved)) for tensor, saved in zip(node.inputs, node.saved) if tensor.requires_grad]


def fused_linear_loss(sim: Sim, normed: Tensor, head: Tensor, d: Dims, opts: Options) -> Tensor:
    """Liger's fused linear cross-entropy (build.fused_linear_loss): no full logits.

    Forward holds grad_input (the hidden states' size and dtype) and grad_weight (the head's) from
    the loss to backward. Per chunk of rows: the logits (compute dtype), autocast's casts of the
    weight (`weight.t()` is a view: not cached; `@ weight` is) and of the rows, and the upcast of the
    logits' gradient to the rows' dtype for grad_weight. Two chunks stand for all: the first fills
    autocast's cache, the rest repeat the second. Row-sized temporaries (a few KB) are left out.
    """
    shifted = shifted_labels(sim)
    grad_input = sim.new(normed.elems, normed.dtype, name="fused grad_input")
    grad_weight = sim.new(head.elems, head.dtype, name="fused grad_weight") if head.requires_grad else None
    loss_rows = sim.new(per_token(1), "f32", name="loss per row")
    valid = sim.new(per_token(1), "bool", name="labels valid")
    rows = const(opts.loss_chunk_rows)
    compute = sim.autocast_dtype
    for _chunk in range(2):
        weight_t = sim.new(head.elems, compute, name="weight.t() cast") if compute and head.dtype != compute else None
        part = sim.new(lf_scale(rows, d.hidden), compute, name="rows cast") if compute and normed.dtype != compute else None
        logits = sim.new(lf_scale(rows, d.vocab), compute or normed.dtype, name="logits chunk")
        sim.drop(weight_t, part)
        weight_c = ops.autocast_operand(sim, head)
        rows_grad = sim.new(lf_scale(rows, d.hidden), logits.dtype, name="grad rows")
        sim.drop(rows_grad, weight_c)
        if grad_weight is not None and logits.dtype != normed.dtype:
            upcast = sim.new(lf_scale(rows, d.vocab), normed.dtype, name="logits grad upcast")
            sim.drop(upcast)
        sim.drop(logits)
    loss = sim.new(const(1), "f32", name="fused loss")
    saved = [grad_input] + ([grad_weight] if grad_weight is not None else [])
    sim.record("fused_linear_cross_entropy", loss, [normed, head], saved, _fused_linear_backward)
    sim.drop(loss_rows, valid, shifted, *saved)
    return loss


def _bucket(sim: Sim, allocated_in: str, freed_in: tuple[str, ...]) -> dict[str, LF]:
    total = {category: ZERO for category in CATEGORIES}
    for tensor in sim.tensors:
        if tensor.segment == allocated_in and tensor.freed_in in freed_in:
            total[tensor.category] = lf_add(total[tensor.category], tensor.nbytes)
    return total


def _plus(live: dict[str, LF], extra: dict[str, LF], times: float) -> dict[str, LF]:
    return {category: lf_add(live[category], lf_scale(extra[category], times)) for category in CATEGORIES}


_PHASE_OF_SEGMENT = {
    "inputs": "forward", "embed_fwd": "forward", "first_fwd": "forward", "mid_fwd": "forward", "last_fwd": "forward",
    "head_fwd": "loss", "loss_fwd": "loss", "forward_end": "loss", "head_bwd": "backward", "loss_bwd": "backward", "last_bwd": "backward", "mid_bwd": "backward",
    "first_bwd": "backward", LOWEST_LAYER_GATHER: "backward", HEAD_GATHER: "backward", **dict.fromkeys(LAYER_BACKWARD_STARTS.values(), "backward"), "embed_bwd": "backward", GRAPH_FREED: "backward", "end": "backward",
}
# A candidate of backward just after a node gave parameters their .grad (Candidate.ready): under
# --optimizer-in-backward their hooks step them there; kept apart from backward's (_dominance compares within a phase).
GRAD_READY = "backward:grad-ready"
_AFTER_FORWARD = ("last_bwd", "mid_bwd", "first_bwd", "embed_bwd", GRAPH_FREED, "")


@lru_cache(maxsize=256)
def compile_step(d: Dims, opts: Options, layers: int, first: bool = True, last: bool = True,
                 accumulating: bool = False, layer_starts: bool = False, layer_gathers: bool = False) -> StepProgram:
    """The step's candidate peaks for `layers` decoder layers (`first` / `last`: a pipeline stage, as _replay;
    `accumulating`: also the moments a later micro-batch's backward peaks at, see Sim.accumulate; `layer_gathers`:
    FSDP2 with ZeRO-3, which holds one layer more in the layers' backward than before it, see _prune).

    The other L-3 layers sit between the replayed middle and last layers. Each keeps
    R_fwd past the next layer's forward, R_post past the forward, and leaves G once
    its backward is done.
    """
    program, dominance = _every_candidate(d, opts, layers, first, last, accumulating, layer_starts)
    kept = tuple(_prune(program.candidates, dominance, layer_gathers))
    return replace(
        program,
        candidates=kept,
        rows=tuple((candidate.phase, *candidate.live["weights"], *candidate.live["gradients"],
                    *candidate.live["activations"], *candidate.live["temporary"],
                    *((*candidate.buffered, *candidate.stepped) if opts.step_in_backward else ()))
              for candidate in kept),
        segments=tuple(candidate.segment for candidate in kept),
    )


@lru_cache(maxsize=256)
def _every_candidate(d: Dims, opts: Options, layers: int, first: bool, last: bool, accumulating: bool,
                     layer_starts: bool) -> tuple[StepProgram, tuple[tuple[bool, bool], ...]]:
    """compile_step's program before _prune (its candidates all, no rows) and their _dominance: the replay, which
    programs that differ only in `layer_gathers` share."""
    sim = _replay(d, opts, layers=layers, first=first, last=last, accumulating=accumulating,
                  layer_starts=layer_starts)
    extra = max(layers - 3, 0)
    kept_forward, kept_backward, left_by_backward = _layer_buckets(sim)
    full = min(round(opts.full_layer_share * max(layers - 2, 0)), extra)
    if full:
        # Gemma 3: the replayed layers are sliding-window ones; the full-attention layers among the other L-3
        # keep what a full-attention layer keeps (no mask, no repeat_kv copies), from a replay of those.
        sliding = _layer_buckets(sim)
        full_kind = _layer_buckets(_replay(d, replace(opts, full_attention_layers=True), layers=layers))
        kept_forward, kept_backward, left_by_backward = (
            _plus(_plus({c: ZERO for c in CATEGORIES}, one, (extra - full) / extra), other, full / extra)
            for one, other in zip(sliding, full_kind))
    dense_extra = _dense_extra_layers(layers, opts.dense_layers)
    if dense_extra and not _dense_segments(["first", "mid", "last"], layers, opts.dense_layers)[1]:
        # DeepSeek-V3: the replayed middle layer is an MoE one; the dense layers among the other L-3 keep what a
        # dense layer keeps, from a replay whose layers are all dense.
        moe_kind = _layer_buckets(sim)
        dense_kind = _layer_buckets(_replay(d, replace(opts, dense_layers=layers), layers=layers))
        kept_forward, kept_backward, left_by_backward = (
            _plus(_plus({c: ZERO for c in CATEGORIES}, one, (extra - dense_extra) / extra), other, dense_extra / extra)
            for one, other in zip(moe_kind, dense_kind))
    candidates: list[StepCandidate] = []
    for candidate in sim.candidates:
        segment = candidate.segment
        phase = GRAD_READY if candidate.ready else _PHASE_OF_SEGMENT.get(segment, "forward")
        buffered, stepped = candidate.buffered, candidate.stepped
        if segment in ("last_fwd", "head_fwd", "loss_fwd"):
            candidates.append(StepCandidate(phase, _plus(candidate.live, kept_forward, extra), segment, buffered, stepped))
        elif segment in ("forward_end", "head_bwd", HEAD_GATHER, "loss_bwd", "last_bwd", LAYER_BACKWARD_STARTS["last_bwd"]):
            candidates.append(StepCandidate(phase, _plus(candidate.live, kept_backward, extra), segment, buffered, stepped))
        elif segment in ("mid_bwd", LAYER_BACKWARD_STARTS["mid_bwd"]):
            candidates.append(StepCandidate(phase, _plus(candidate.live, kept_backward, extra), segment, buffered, stepped))
            candidates.append(StepCandidate(phase, _plus(candidate.live, left_by_backward, extra), segment, buffered, stepped))
            if layer_starts and segment == "mid_bwd" and extra > 1 and opts.dense_layers:
                # (with one extra layer, the top middle layer is it) FSDP2 prefetches the layer below at its own size:
                # the lowest middle layer the stage's first (a DeepSeek-V3 dense layer, smaller), the one above it a
                # middle one, so that one is a candidate too. Only where the stage's lowest layer is smaller: with
                # layers of one kind the traces peak at the replayed moments (Phi-3's LoRA stages at tp 2 with
                # ZeRO-3: +0.32% with this candidate, exact without)
                above = _plus(_plus(candidate.live, left_by_backward, extra - 1), kept_backward, 1)
                candidates.append(StepCandidate(phase, above, ABOVE_LOWEST_MIDDLE, buffered, stepped))
        elif segment in ("first_bwd", LOWEST_LAYER_GATHER, "embed_bwd", "end"):
            candidates.append(StepCandidate(phase, _plus(candidate.live, left_by_backward, extra), segment, buffered, stepped))
        else:
            candidates.append(StepCandidate(phase, dict(candidate.live), segment, buffered, stepped))
    gradients_end = lf_add(sim.live["gradients"], lf_scale(left_by_backward["gradients"], extra))
    layer_saved = ZERO
    for category in CATEGORIES:
        layer_saved = lf_add(layer_saved, kept_backward[category])
    logits = per_token(d.vocab * {"f32": 4, "bf16": 2, "f16": 2}[opts.compute])
    offloaded = ZERO
    for segment, packed in sim.offloaded.items():
        offloaded = lf_add(offloaded, lf_scale(packed, 1 + extra if segment == "mid_fwd" else 1))
    held = _plus(getattr(sim, "held_after_forward", sim.live), kept_backward, extra)
    held_bytes = ZERO
    for category in CATEGORIES:
        if category != "gradients":  # "weights" here: autocast's 16-bit copies, which the graph saves
            held_bytes = lf_add(held_bytes, held[category])
    # A later pipeline stage under LoRA: the head's forward and backward hold FSDP2's all-gather buffers the loss's
    # moments do not (the last layer's, the root's), and no gradient of the head makes a later moment larger
    gathers = ("head_fwd", "head_bwd") if sim.head_gather else ()
    program = StepProgram(
        candidates=tuple(candidates),
        gradients_end=gradients_end,
        layer_saved=layer_saved,
        layer_gradients=left_by_backward["gradients"],
        logits_bytes=logits,
        offloaded_bytes=offloaded,
        held_after_forward=held_bytes,
    )
    return program, _dominance(candidates, accumulating, gathers)


def _dense_extra_layers(layers: int, dense_layers: int) -> int:
    """DeepSeek-V3's dense layers among the L-3 layers the replayed middle one stands for (layers 1..L-2 but it)."""
    if not dense_layers or layers <= 3:
        return 0
    middle_dense = min(dense_layers, layers - 1) - 1  # dense ones among layers 1..L-2
    return middle_dense - 1 if middle_dense == layers - 2 else middle_dense


def _layer_buckets(sim: Sim) -> tuple[dict[str, LF], dict[str, LF], dict[str, LF]]:
    """What one middle layer keeps past the next layer's forward, keeps until backward, and leaves after it."""
    # A layer done with backward leaves its gradients and, until the graph is freed, what ctx attributes keep.
    left = _plus(_bucket(sim, "mid_bwd", ("",)), _bucket(sim, "mid_fwd", (GRAPH_FREED,)), 1)
    return (_bucket(sim, "mid_fwd", ("forward_end", "head_fwd", "loss_fwd", "head_bwd", "loss_bwd") + _AFTER_FORWARD),
            _bucket(sim, "mid_fwd", _AFTER_FORWARD), left)


def _total(live: dict[str, LF]) -> LF:
    total = ZERO
    for value in live.values():
        total = lf_add(total, value)
    return total


def _dominance(candidates: list[StepCandidate], accumulating: bool = False,
               gathers: tuple[str, ...] = ()) -> tuple[tuple[bool, bool], ...]:
    """For each candidate, whether another dominates it for every batch size and sequence length, judged as _prune
    does without and with `layer_gathers` (one _prune's work serves both)."""
    totals = [_total(candidate.live) for candidate in candidates]
    if accumulating:
        totals = [(*total, *_total({**candidate.live, "gradients": ZERO}))
                  for total, candidate in zip(totals, candidates)]
    # Only within a phase (every phase keeps its own peak for the timeline), and only a candidate whose figures add
    # up to as much can hold as much in each (fsum, correctly rounded, is monotone in its terms): largest first.
    sums = [fsum(total) for total in totals]
    by_phase: dict[str, list[int]] = {}
    for index in sorted(range(len(totals)), key=lambda index: -sums[index]):
        by_phase.setdefault(candidates[index].phase, []).append(index)
    dominance = []
    for index, total in enumerate(totals):
        by_any = by_one_gathering_as_much = False
        in_layers = candidates[index].segment not in BEFORE_LAYERS_BACKWARD
        for other_index in by_phase[candidates[index].phase]:
            if sums[other_index] < sums[index]:
                break
            other = totals[other_index]
            if other_index == index:
                continue
            if candidates[index].segment in gathers and candidates[other_index].segment != candidates[index].segment:
                continue
            if all(o >= t for o, t in zip(other, total)) and (other != total or other_index < index):
                by_any = True
                if not (in_layers and candidates[other_index].segment in BEFORE_LAYERS_BACKWARD):
                    by_one_gathering_as_much = True
                    break
        dominance.append((by_any, by_one_gathering_as_much))
    return tuple(dominance)


def _prune(candidates: tuple[StepCandidate, ...], dominance: tuple[tuple[bool, bool], ...],
           layer_gathers: bool = False) -> list[StepCandidate]:
    """Drop candidates another one dominates for every batch size and sequence length (_dominance: in what they hold
    beside the gradients too where accumulating: a later micro-batch's backward holds every gradient from its start;
    `gathers`: segments whose candidates only one of the same segment can dominate, FSDP2 gathers apart there);
    `layer_gathers`: a candidate in the layers' backward is not dropped for one before them (BEFORE_LAYERS_BACKWARD).
    """
    kept = []
    for candidate, (by_any, by_one_gathering_as_much) in zip(candidates, dominance):
        dominated = by_one_gathering_as_much if layer_gathers else by_any
        # FSDP2's moment, and each step in backward (its temporaries are not in the total): kept for them
        if (not dominated or candidate.segment in (LOWEST_LAYER_GATHER, HEAD_GATHER, ABOVE_LOWEST_MIDDLE,
                                                   *LAYER_BACKWARD_STARTS.values())
                or candidate.phase == GRAD_READY):
            kept.append(candidate)
    return kept


@dataclass(frozen=True)
class AllocationProgram:
    """One training step's device allocations and frees in order, every layer replayed, sizes symbolic.

    `events`: (tensor index, bytes) for an allocation, (tensor index, None) for its free. The step's own
    `input_ids` are left out (the training loop makes the batch, `input_ids` says which tensor it is);
    what is still alive after backward is the parameter gradients (`gradients`, in parameter order, freed by
    zero_grad) and, in `leftover`, anything else the step's end releases.
    """

    parameters: tuple[tuple[LF, bool], ...]  # (bytes, trainable), in model.parameters() order
    events: tuple[tuple[int, LF | None], ...]
    input_ids: LF
    gradients: tuple[tuple[int, int], ...]  # (parameter index, tensor index) of each gradient alive at the end
    leftover: tuple[int, ...]
    # Where each event happens: (layer, "fwd" | "bwd") inside decoder layer `layer` (0 the lowest), else
    # (-1, segment) outside the layers (embed_fwd, head_fwd, loss_fwd, forward_end, loss_bwd, ...): the points
    # FSDP2 gathers and reshards at (memtui.engine.estimator.fsdp_sequence).
    places: tuple[tuple[int, str], ...] = ()
    layer_parameters: tuple[tuple[int, int], ...] = ()  # (first, end) of each decoder layer's in `parameters`


@lru_cache(maxsize=16)
def allocation_program(d: Dims, opts: Options, layers: int) -> AllocationProgram:
    """The step over all `layers` decoder layers with every allocation logged.

    Replaying every layer costs about 2.5 ms a layer (most of a second for 80). Past five layers the
    program is built from a five-layer replay instead, its third layer repeated for every middle layer:
    identical layers allocate and free identically, each touching its own tensors and those of the layers near it.
    Where that does not hold for a program (checked as it is built) every layer is replayed.
    """
    if layers > len(_TEMPLATE) and not opts.dense_layers:  # DeepSeek-V3's dense layers: every layer replayed
        program = _expanded_program(d, opts, layers)
        if program is not None:
            return program
    return every_layer_program(d, opts, layers)


def every_layer_program(d: Dims, opts: Options, layers: int) -> AllocationProgram:
    """allocation_program with every layer replayed (what the five-layer expansion must equal)."""
    sim = _replay(d, opts, layers=layers, log=True, every_layer=True)
    entries = [(kind, id(tensor), tensor) for kind, tensor, _segment in sim.log or ()]
    layer_of = {f"{name}_{phase}": (index, phase) for index, name in enumerate(_layer_segments(layers, True))
                for phase in ("fwd", "bwd")}
    places = [layer_of.get(segment, (-1, segment)) for _kind, _tensor, segment in sim.log or ()]
    parameters = [(param, id(param.grad) if param.grad is not None and param.grad.alive else None)
                  for param in sim.parameters]
    return _assemble(entries, parameters, [id(tensor) for tensor in sim.tensors if tensor.alive], places,
                     tuple(sim.layer_parameters))  # type: ignore[attr-defined]


_TEMPLATE = ["first", "midA", "midB", "midC", "last"]  # midB stands for every layer between midA and midC
_TEMPLATE_LAYER = {name: index for index, name in enumerate(_TEMPLATE)}


class _NotPeriodic(Exception):
    """The five-layer replay does not extend by repeating its middle layer."""


def _template_layer(segment: str) -> int | None:
    return _TEMPLATE_LAYER.get(segment.rsplit("_", 1)[0])


def _expanded_program(d: Dims, opts: Options, layers: int) -> AllocationProgram | None:
    sim = _replay(d, opts, layers=len(_TEMPLATE), log=True, segments=_TEMPLATE)
    log = sim.log or []
    # Output layers: 0 first, 1 midA, 2..layers-3 copies of midB, layers-2 midC, layers-1 last.
    real = {0: "first", 1: "midA", layers - 2: "midC", layers - 1: "last"}
    allocated: dict[str, list[Tensor]] = {}
    for kind, tensor, segment in log:
        if kind == "+":
            allocated.setdefault(segment, []).append(tensor)
    # Each layer's tensors against midB's, by place in the layer's allocations (where the layers allocate alike).
    to_mid_b: dict[int, Tensor] = {}
    from_mid_b: dict[str, dict[int, Tensor]] = {name: {} for name in _TEMPLATE}
    for phase in ("fwd", "bwd"):
        template = allocated.get(f"midB_{phase}", [])
        for name in _TEMPLATE:
            tensors = allocated.get(f"{name}_{phase}", [])
            if len(tensors) == len(template) and all(a.nbytes == b.nbytes for a, b in zip(tensors, template)):
                to_mid_b.update({id(a): b for a, b in zip(tensors, template)})
                from_mid_b[name].update({id(b): a for a, b in zip(tensors, template)})
    if not {"midA", "midC"} <= {name for name in _TEMPLATE if from_mid_b[name]}:
        return None

    def key(tensor: Tensor, event_template: int | None, event_layer: int | None) -> object:
        """The key of `tensor` as an event of template layer `event_template`, placed at output layer
        `event_layer`, refers to it (both None: an event outside the layers)."""
        owner = _template_layer(tensor.segment)
        if owner is None or owner != 2 and event_template is None:
            return id(tensor)  # outside the layers, or a layer replayed once
        if event_template is None or event_layer is None:
            raise _NotPeriodic
        layer = event_layer + owner - event_template
        if layer < 0 or layer >= layers:
            raise _NotPeriodic
        name = real.get(layer)
        if name == _TEMPLATE[owner]:
            return id(tensor)
        counterpart = tensor if owner == 2 else to_mid_b.get(id(tensor))
        if counterpart is None:
            raise _NotPeriodic
        if name is None:
            return (layer, id(counterpart))
        own = from_mid_b[name].get(id(counterpart))
        if own is None:
            raise _NotPeriodic
        return id(own)

    def owned_by_mid_b(tensor: Tensor) -> bool:
        return _template_layer(tensor.segment) == 2

    try:
        entries: list[tuple[str, object, Tensor]] = []
        places: list[tuple[int, str]] = []
        copies_up, copies_down = range(2, layers - 2), range(layers - 3, 1, -1)
        index = 0
        while index < len(log):
            segment = log[index][2]
            template = _template_layer(segment)
            end = index + 1
            if template == 2:
                while end < len(log) and log[end][2] == segment:
                    end += 1
                order = copies_up if segment.endswith("_fwd") else copies_down
                for at in order:
                    entries += [(kind, key(tensor, 2, at), tensor) for kind, tensor, _segment in log[index:end]]
                    places += [(at, segment[-3:])] * (end - index)
            elif template is None and owned_by_mid_b(log[index][1]):
                # Outside the layers, about midB's tensors (autocast's cache cleared after the forward): once for
                # every copy, a block of them at a time.
                while end < len(log) and log[end][2] == segment and owned_by_mid_b(log[end][1]):
                    end += 1
                order = copies_down if segment.endswith("_bwd") or segment == "end" else copies_up
                for at in order:
                    entries += [(kind, key(tensor, 2, at), tensor) for kind, tensor, _segment in log[index:end]]
                    places += [(-1, segment)] * (end - index)
            else:
                kind, tensor, _segment = log[index]
                layer = None if template is None else {0: 0, 1: 1, 3: layers - 2, 4: layers - 1}[template]
                entries.append((kind, key(tensor, template, layer), tensor))
                places.append((-1, segment) if layer is None else (layer, segment[-3:]))
            index = end
        if sum(1 for i in range(len(log)) if log[i][2] == "midB_fwd" and (i == 0 or log[i - 1][2] != "midB_fwd")) > 1:
            return None  # midB's forward in pieces: not one layer's run
        ranges = sim.layer_parameters  # type: ignore[attr-defined]
        params = sim.parameters

        def with_grad(param: Tensor, template: int | None, layer: int | None) -> tuple[Tensor, object]:
            grad = param.grad
            return (param, None if grad is None or not grad.alive else key(grad, template, layer))

        parameters = [with_grad(param, None, None) for param in params[: ranges[0][0]]]
        layer_parameters: list[tuple[int, int]] = []
        for template, (first, end) in enumerate(ranges):
            at_layers = copies_up if template == 2 else [{0: 0, 1: 1, 3: layers - 2, 4: layers - 1}[template]]
            for layer in at_layers:
                layer_parameters.append((len(parameters), len(parameters) + end - first))
                parameters += [with_grad(param, template, layer) for param in params[first:end]]
        parameters += [with_grad(param, None, None) for param in params[ranges[-1][1]:]]
        if any(tensor.alive and owned_by_mid_b(tensor) and tensor.category != "gradients" for tensor in sim.tensors):
            return None
        alive = [id(tensor) for tensor in sim.tensors if tensor.alive and not owned_by_mid_b(tensor)]
        alive += [grad for _param, grad in parameters if grad is not None]
    except _NotPeriodic:
        return None
    return _assemble(entries, parameters, alive, places, tuple(layer_parameters))


def _assemble(entries: list[tuple[str, object, Tensor]], parameters: list[tuple[Tensor, object]],
              alive: list[object], places: list[tuple[int, str]],
              layer_parameters: tuple[tuple[int, int], ...]) -> AllocationProgram:
    """Number the tensors by allocation; `entries`: (+ or -, key, tensor) in order, `places` where each happens;
    `parameters`: (parameter, key of its gradient alive at the end or None); `alive`: the keys of every tensor
    alive at the end."""
    index_of: dict[object, int] = {}
    events: list[tuple[int, LF | None]] = []
    event_places: list[tuple[int, str]] = []
    input_ids = None
    for (kind, tensor_key, tensor), place in zip(entries, places, strict=True):
        if tensor.name == "input_ids" and (input_ids is None or tensor is input_ids):
            input_ids = tensor  # the batch: the training loop's, not the step's
            continue
        event_places.append(place)
        if kind == "+":
            index = index_of[tensor_key] = len(index_of)
            events.append((index, tensor.nbytes))
        else:
            events.append((index_of[tensor_key], None))
    gradients = tuple((position, index_of[grad]) for position, (_param, grad) in enumerate(parameters)
                      if grad is not None and grad in index_of)
    held = {index for _position, index in gradients}
    leftover = tuple(index_of[k] for k in alive if k in index_of and index_of[k] not in held)
    return AllocationProgram(
        parameters=tuple((param.nbytes, param.requires_grad) for param, _grad in parameters),
        events=tuple(events), input_ids=input_ids.nbytes if input_ids is not None else ZERO,
        gradients=gradients, leftover=leftover, places=tuple(event_places), layer_parameters=layer_parameters)
