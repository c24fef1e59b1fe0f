"""transformers' decoder-only models as tensor programs for the replay.

Each function mirrors the model's forward in transformers, line by line where
it matters for memory: which tensors are created, in which dtype, and how long
Python variables keep them alive (for example LlamaDecoderLayer keeps the
normalised input alive until self-attention returns).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memtui.engine.estimator.layout import REPLICATED, ROW_PARALLEL
from memtui.engine.estimator.sim import ops
from memtui.engine.model.architectures import GEMMA_FAMILIES, MOE_FAMILIES, QK_NORM_FAMILIES
from memtui.engine.estimator.sim.core import Sim, Tensor, const, lf_add, lf_scale, per_position, per_token


@dataclass(frozen=True)
class Dims:
    hidden: int
    q_dim: int
    kv_dim: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    positions: int = 0  # learned position embeddings (GPT-2)
    latent: object = None  # DeepSeek-V3: its attention's and MLPs' sizes (memtui.engine.estimator.sim.deepseek)


@dataclass(frozen=True)
class Options:
    family: str
    compute: str  # dtype of matmuls: f32, bf16, f16
    params: str  # dtype of trainable (and unquantized) weights
    base: str  # dtype of frozen, unquantized base weights
    autocast: bool
    attention: str  # flash | eager
    checkpointing: str  # none | selective | selective-op | full
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora_dtype: str
    quant: str  # none | int8 | nf4
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    batched: bool = False  # batch > 1: some layouts stop being contiguous (see phi3_attention)
    window_mask: bool = False  # SDPA gets an explicit sliding-window mask (sequence longer than the window)
    attention_softcap: bool = False  # Gemma-2: tanh soft-capping of the attention scores (eager)
    logit_softcap: bool = False  # Gemma-2: tanh soft-capping of the logits
    eager_softmax_f32: bool = True  # softmax(..., dtype=float32) in eager attention; GPT-2 keeps the input dtype
    loss: str = "standard"  # standard | chunked | fused-linear (--loss)
    loss_chunks: int = 8  # chunked: sequence chunks
    loss_dtype: str = "fp32"  # chunked: fp32 (torchtune's upcast) | compute (LitGPT's chunked_cross_entropy)
    compiled_loss: bool = False  # --compile without --eager-loss: the loss as one graph (or one per chunk)
    logits_upcast: str = "loss"  # standard: loss (transformers' ForCausalLMLoss) | model (torchtune's .float())
    loss_chunk_rows: int = 0  # fused-linear: rows of logits per chunk (Liger's, from the step's tokens)
    lora_dropout: float = 0.0  # peft's nn.Dropout on each adapter's input (--lora-dropout)
    lora_head: bool = False  # peft's LoRA on lm_head too (`lm_head` in --lora-targets)
    # bitsandbytes before 0.43.2 (--bnb-version legacy): MatMul4Bit keeps its input as a ctx attribute until the
    # step's graph is freed (Sim.keep_until_graph_freed)
    bnb_legacy: bool = False
    # --activation-offload: the decoder's saved tensors go to host memory; min_offload_size is judged at these
    # (tokens, seq_len), capped where every tensor that grows with them is past it (keeps the cache small).
    activation_offload: bool = False
    offload_point: tuple[float, float] = (0.0, 0.0)
    rope_pairs: int = 1  # Gemma 3: a (cos, sin) pair per attention type (sliding and full layers)
    norm_topk: bool = True  # Qwen3-MoE: norm_topk_prob (the top-k weights renormalised to sum to 1)
    # Gemma 3 with a sliding-window mask: the share of full-attention layers among the middle ones (their SDPA
    # gets no mask), and whether the replayed layers are full-attention ones (compile_step replays both kinds).
    full_layer_share: float = 0.0
    full_attention_layers: bool = False
    last_layer_full: bool = False  # Gemma 3: the model's last layer is a full-attention one (gemma-3-12b's is)
    first_layer_full: bool = False  # and its first (a pipeline stage's can be)
    # Gemma 3 on a pipeline stage: the replayed layer standing for the stage's lowest full-attention layer, whose
    # backward lets the second (cos, sin) pair go ("": the middle one, or the last)
    rope_holder: str = ""
    # --optimizer-in-backward (one GPU or DDP, no pipeline): a gradient summed from several uses waits in autograd's
    # input buffer until the last (Sim.step_in_backward); its hook's step is a moment of its own (GRAD_READY)
    step_in_backward: bool = False
    compiled: bool = False  # --compile: each decoder layer as torch.compile runs it (sim/compiled.py)
    dense_layers: int = 0  # DeepSeek-V3: the first layers' MLP is dense (first_k_dense_replace)
    sequence_parallel: int = 1  # ranks of DTensor's sequence-parallel plan (memtui trace's TP): norms on 1/tp
    float8: bool = False  # --float8 tensorwise: the decoder's linears are torchao Float8Linears (ops.float8_linear)
    litgpt: bool = False  # --modeling litgpt: LitGPT's GPT and LoRA layers (memtui.engine.estimator.sim.litgpt)
    litgpt_window: bool = False  # and its config sets sliding_window_size: each layer builds its T x T masks


def fused_linear_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's fused linear cross-entropy chunk: logits of about tokens x hidden elements at a time.

    inc_factor = cdiv(V, H); chunk = next_power_of_2(cdiv(BT, inc_factor)), at most BT.
    """
    factor = -(-vocab // hidden)
    rows = -(-tokens // factor)
    return min(1 << max(rows - 1, 0).bit_length(), tokens)


@dataclass
class LayerParams:
    linears: dict[str, Tensor] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    norms: list[Tensor] = field(default_factory=list)
    qk_norms: list[Tensor] = field(default_factory=list)  # q_norm, k_norm weights
    sinks: Tensor | None = None  # gpt-oss: one learned attention sink per head


# ---- parameters -------------------------------------------------------------------------------
def make_linear(sim: Sim, params: LayerParams, name: str, d_in: int, d_out: int, opts: Options, bias: bool) -> None:
    frozen_base = opts.lora_rank > 0
    quantized = opts.quant != "none"
    dtype = opts.base if frozen_base else opts.params
    params.linears[name] = sim.parameter(const(d_in * d_out), dtype, name=name, trainable=not frozen_base)
    if quantized:
        params.linears[name].quantized = True  # type: ignore[attr-defined]
    params.linears[name].shape = (d_out, d_in)  # type: ignore[attr-defined]
    if bias:
        params.biases[name] = sim.parameter(const(d_out), dtype, name=name + ".bias", trainable=not frozen_base)
    if name in opts.lora_targets:
        rank_a = rank_b = opts.lora_rank
        parallel = _adapter_parallelism(name, opts)
        if parallel == "column":  # ColwiseParallelLora: A's rows sharded (B's with the base layer's: d_out)
            rank_a = _local_rank(opts)
        elif parallel == "row":  # RowwiseParallelLora: B's columns sharded (A's with the base layer's: d_in)
            rank_b = _local_rank(opts)
        a = sim.parameter(const(d_in * rank_a), opts.lora_dtype, name=name + ".lora_A", trainable=True)
        b = sim.parameter(const(rank_b * d_out), opts.lora_dtype, name=name + ".lora_B", trainable=True)
        params.lora[name] = (a, b)


def _adapter_parallelism(name: str, opts: Options) -> str:
    """How NeMo Automodel's LoRA-aware plan shards this linear's adapters: "column", "row", or "" (one GPU, or
    DeepSeek-V3's replicated low-rank projections). Row-parallel: the traced plan's RowwiseParallel linears."""
    if opts.sequence_parallel == 1 or name in REPLICATED:
        return ""
    return "row" if name in ROW_PARALLEL else "column"


def _local_rank(opts: Options) -> int:
    """The sharded rank dimension on rank 0 (DTensor's Shard: the first ranks take the larger chunks)."""
    return -(-opts.lora_rank // opts.sequence_parallel)


def norm_weight(sim: Sim, width: int, opts: Options, name: str) -> Tensor:
    frozen = opts.lora_rank > 0
    return sim.parameter(const(width), opts.base if frozen else opts.params, name=name, trainable=not frozen)


# ---- building blocks ---------------------------------------------------------------------------
def apply_linear(sim: Sim, x: Tensor, params: LayerParams, name: str, d_in: int, d_out: int, opts: Options) -> Tensor:
    """nn.Linear, or peft's LoRA Linear around it, or a bitsandbytes quantized base."""
    weight = params.linears[name]
    bias = params.biases.get(name)
    if getattr(weight, "quantized", False):
        result = quantized_linear(sim, x, weight, d_in, d_out, opts, bias)
    elif opts.float8 and float8_converts(d_in, d_out):
        result = ops.float8_linear(sim, x, weight, d_out, d_in, bias)
    else:
        result = ops.linear(sim, x, weight, d_out, d_in, bias, op="addmm" if opts.family == "gpt2" else "linear")
    if name not in params.lora:
        return result
    if getattr(weight, "quantized", False):
        return lora_branch_bnb(sim, x, result, params.lora[name], d_in, d_out, opts)
    return lora_branch(sim, x, result, params.lora[name], d_in, d_out, opts, parallel=_adapter_parallelism(name, opts))


def float8_converts(d_in: int, d_out: int) -> bool:
    """Which linears memtui's float8 conversion swaps: torch._scaled_mm needs both dimensions divisible by 16
    (torchtitan's auto_filter_small_kn and torchao's own filter skip the others; the output head is never
    converted: torchtitan filters "output")."""
    return d_in % 16 == 0 and d_out % 16 == 0


def lora_branch_bnb(sim: Sim, x: Tensor, result: Tensor, adapters: tuple[Tensor, Tensor], d_in: int, d_out: int, opts: Options) -> Tensor:
    """peft's bitsandbytes LoRA layers: clone the 4-bit result; convert dtypes only without autocast."""
    lora_a, lora_b = adapters
    if opts.quant == "nf4":
        cloned = ops.contiguous_copy(sim, result)  # "defensively clone" (peft, for 4-bit)
        sim.drop(result)
        result = cloned
    convert = not opts.autocast
    x_in = ops.cast(sim, x, lora_a.dtype) if convert else sim.ref(x)
    x_in = chain(sim, x_in, lambda sim_, t: ops.dropout(sim_, t, opts.lora_dropout))
    hidden = ops.linear(sim, x_in, lora_a, opts.lora_rank, d_in)
    sim.drop(x_in)
    delta = ops.linear(sim, hidden, lora_b, d_out, opts.lora_rank)
    sim.drop(hidden)
    if opts.quant == "nf4":
        output = ops.mul_scalar(sim, delta)
        sim.drop(delta)
        if convert:
            converted = ops.cast(sim, output, result.dtype)
            sim.drop(output)
            output = converted
    else:
        if convert:
            converted = ops.cast(sim, delta, result.dtype)
            sim.drop(delta)
            delta = converted
        output = ops.mul_scalar(sim, delta)
        sim.drop(delta)
    total = ops.add(sim, result, output)
    sim.drop(result, output)
    return total


def lora_branch(sim: Sim, x: Tensor, result: Tensor, adapters: tuple[Tensor, Tensor], d_in: int, d_out: int, opts: Options,
                *, strided: bool = False, parallel: str = "") -> Tensor:
    """peft's lora.Linear.forward: result + lora_B(lora_A(dropout(x))) * scaling (dropout: nn.Identity at 0).
    `strided`: x is a non-contiguous view (a sequence chunk of a batch), which lora_A's reshape copies when
    neither the dtype cast, the dropout nor autocast made a contiguous tensor of it first. `parallel`: NeMo
    Automodel's LoRA-aware tensor-parallel styles (memtui.engine.trace.tensor_parallel_lora): "column", lora_A's
    output (the rank's rows of A) all-gathered before lora_B; "row", lora_A's output a partial sum that lora_B
    (the rank's columns of B) reduce-scatters inside its matmul."""
    lora_a, lora_b = adapters
    rank = opts.lora_rank
    # peft rebinds its `x` to the input cast to the adapter's dtype: that copy lives until forward returns
    held = ops.cast(sim, x, lora_a.dtype)
    x_in = ops.dropout(sim, held, opts.lora_dropout)
    if strided and x_in is x and (sim.autocast_dtype is None or x.dtype == sim.autocast_dtype):
        x_in = chain(sim, x_in, ops.contiguous_copy)
    if parallel == "column":
        local = ops.linear(sim, x_in, lora_a, _local_rank(opts), d_in)
        sim.drop(x_in)
        hidden = ops.all_gather_columns(sim, local, opts.sequence_parallel, rank / _local_rank(opts))
        sim.drop(local)
    else:
        hidden = ops.linear(sim, x_in, lora_a, rank, d_in)
        sim.drop(x_in)
    if parallel == "row":
        delta = ops.partial_input_linear(sim, hidden, lora_b, d_out, rank, _local_rank(opts))
    else:
        delta = ops.linear(sim, hidden, lora_b, d_out, rank)
    sim.drop(hidden)
    scaled = ops.mul_scalar(sim, delta)
    sim.drop(delta)
    total = ops.add(sim, result, scaled)
    sim.drop(result, scaled)
    if total.dtype != result.dtype:
        converted = ops.cast(sim, total, result.dtype)  # peft returns the base layer's dtype
        sim.drop(total)
        total = converted
    sim.drop(held)
    return total


def quantized_linear(sim: Sim, x: Tensor, weight: Tensor, d_in: int, d_out: int, opts: Options, bias: Tensor | None) -> Tensor:
    """bitsandbytes Linear4bit / Linear8bitLt around a frozen quantized weight; only the quantized state is saved."""
    n = d_in * d_out
    if opts.quant == "nf4":
        x_c = ops.cast(sim, x, opts.compute)  # Linear4bit casts its input to compute_dtype
        if opts.bnb_legacy and x_c.requires_grad:
            # bitsandbytes before 0.43.2, MatMul4Bit.forward: `if any(ctx.needs_input_grad[:2]): ctx.tensors = (A, B)`
            sim.keep_until_graph_freed(x_c)
        absmax_dq = sim.new(const(4 * -(-n // 64) / 4), "f32", name="absmax dequantized")
        absmax = sim.new(const(4 * -(-n // 64) / 4), "f32", name="absmax + offset")
        dequantized = sim.new(const(n), opts.compute, name="dequantized weight")
        out = sim.policy_saved(lf_scale(x_c.elems, d_out / d_in), opts.compute, name="quantized linear")  # F.linear
        sim.drop(dequantized, absmax, absmax_dq)

        def backward(sim: Sim, node, grad):
            source = node.inputs[0]
            nested = sim.new(const(-(-n // 64)), "f32", name="absmax (backward)")
            again = sim.new(const(n), grad.dtype, name="dequantized weight (backward)")
            grad_input = sim.new(source.elems, grad.dtype, name="quantized linear grad input")
            sim.drop(again, nested)
            return [(source, grad_input)]
    else:
        x_c = sim.ref(x)
        a16 = ops.cast(sim, x, "f16")
        quantized = sim.new(a16.elems, "i8", name="int8 input")
        row_scale = sim.new(lf_scale(a16.elems, 1 / d_in), "f32", name="int8 row scale")
        product = sim.new(lf_scale(a16.elems, d_out / d_in), "i32", name="int32 product")
        sim.drop(a16, quantized)
        out = sim.new(lf_scale(x.elems, d_out / d_in), "f16", name="quantized linear")
        sim.drop(product, row_scale)

        def backward(sim: Sim, node, grad):
            source = node.inputs[0]
            dequantized = sim.new(const(n), source.dtype, name="dequantized weight (backward)")
            scale = sim.new(const(d_out), "f32", name="weight scale")
            grad_c = ops.cast(sim, grad, source.dtype)
            grad_input = sim.new(source.elems, source.dtype, name="quantized linear grad input")
            sim.drop(grad_c, dequantized, scale)
            return [(source, grad_input)]

    sim.record("quantized_linear", out, [x_c], [], backward)
    sim.drop(x_c)
    if bias is not None:
        # Linear4bit adds the bias in the compute dtype (after k-bit prep made it fp32: a copy each forward).
        bias_c = ops.cast(sim, bias, opts.compute) if opts.quant == "nf4" else sim.ref(bias)
        biased = ops.add(sim, out, bias_c)
        sim.drop(out, bias_c)
        out = biased
    if out.dtype != x.dtype:
        converted = ops.cast(sim, out, x.dtype)  # .to(inp_dtype)
        sim.drop(out)
        out = converted
    return out


def rms_norm(sim: Sim, x: Tensor, weight: Tensor, width: int, *, gemma: bool = False, olmo: bool = False,
             litgpt: bool = False) -> Tensor:
    """LlamaRMSNorm (and GemmaRMSNorm, which scales by 1 + weight in fp32; Olmo2RMSNorm, which multiplies by
    the weight before casting back: `(weight * x).to(input_dtype)`; LitGPT's RMSNorm (litgpt/model.py:1315),
    which squares by x * x and multiplies by weight.float() before casting back)."""
    input_dtype = x.dtype
    x32 = ops.cast(sim, x, "f32")
    squared = ops.mul(sim, x32, x32) if litgpt else ops.pow_(sim, x32)
    variance = ops.mean_last(sim, squared, width)
    sim.drop(squared)
    shifted = ops.add_scalar(sim, variance)
    inverse = ops.rsqrt(sim, shifted)
    sim.drop(shifted)
    normed = ops.mul(sim, x32, inverse)
    if litgpt:  # x, norm_x and x_normed are locals until forward returns
        sim.drop(inverse)
        weight32 = ops.cast(sim, weight, "f32")
        scaled = ops.mul(sim, normed, weight32)
        sim.drop(weight32)
        out = ops.cast(sim, scaled, input_dtype)
        sim.drop(scaled, normed, variance, x32)
        return out
    sim.drop(inverse, x32, variance)
    if gemma:
        weight32 = ops.cast(sim, weight, "f32")
        one_plus = ops.add_scalar(sim, weight32)
        sim.drop(weight32)
        scaled = ops.mul(sim, normed, one_plus)
        sim.drop(one_plus, normed)
        out = ops.cast(sim, scaled, input_dtype)
        sim.drop(scaled)
        return out
    if olmo:
        scaled = ops.mul(sim, weight, normed)
        out = ops.cast(sim, scaled, input_dtype)
        sim.drop(scaled, normed)
        return out
    normed_cast = ops.cast(sim, normed, input_dtype)
    out = ops.mul(sim, weight, normed_cast)
    sim.drop(normed_cast, normed)  # `hidden_states` (fp32) is a local until forward returns
    return out


def rotate_half(sim: Sim, x: Tensor) -> Tensor:
    first = ops.slice_view(sim, x, 0.5)
    second = ops.slice_view(sim, x, 0.5)
    negated = ops.neg(sim, second)
    out = ops.cat(sim, [negated, first], x.elems)
    sim.drop(negated, first, second)
    return out


def apply_rope(sim: Sim, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(x * cos) + (rotate_half(x) * sin)."""
    with_cos = ops.mul(sim, x, cos)
    rotated = rotate_half(sim, x)
    with_sin = ops.mul(sim, rotated, sin)
    sim.drop(rotated)
    out = ops.add(sim, with_cos, with_sin)
    sim.drop(with_cos, with_sin)
    return out


# ---- Llama family (Llama, Mistral, Qwen2, Qwen3, Mixtral's attention) ----------------------------------
def llama_attention(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """LlamaAttention.forward with transformers' SDPA (native GQA, is_causal) or eager attention."""
    h = d.hidden
    olmo = opts.family == "olmo2"
    q_lin = apply_linear(sim, x, p, "q_proj", h, d.q_dim, opts)
    if olmo:  # Olmo2Attention: q_norm(q_proj(x)) over the whole projection, then the per-head view
        q_lin = whole_width_norm(sim, q_lin, p.qk_norms[0], d.q_dim, opts)
    q = ops.view_needing_copy_in_backward(sim, q_lin)
    sim.drop(q_lin)
    k_lin = apply_linear(sim, x, p, "k_proj", h, d.kv_dim, opts)
    if olmo:
        k_lin = whole_width_norm(sim, k_lin, p.qk_norms[1], d.kv_dim, opts)
    k = ops.view_needing_copy_in_backward(sim, k_lin)
    sim.drop(k_lin)
    v_lin = apply_linear(sim, x, p, "v_proj", h, d.kv_dim, opts)
    v = ops.view(sim, v_lin)
    sim.drop(v_lin)
    if p.qk_norms and not olmo:  # Qwen3 and Qwen3-MoE per head; Gemma 3 per head, Gemma's (1 + weight) norm
        gemma = opts.family == "gemma3"
        q_normed = rms_norm(sim, q, p.qk_norms[0], d.head_dim, gemma=gemma)
        k_normed = rms_norm(sim, k, p.qk_norms[1], d.head_dim, gemma=gemma)
        sim.drop(q, k)
        q, k = q_normed, k_normed
    q_rope = apply_rope(sim, q, cos, sin)
    k_rope = apply_rope(sim, k, cos, sin)
    if olmo:  # OLMo 2's cos and sin stay fp32: RoPE runs in fp32, then `.to(q_type)`
        q_rope = chain(sim, q_rope, lambda sim_, t: ops.cast(sim_, t, q.dtype))
        k_rope = chain(sim, k_rope, lambda sim_, t: ops.cast(sim_, t, k.dtype))
    sim.drop(q, k)
    return attend_and_project(sim, q_rope, k_rope, v, p, d, opts)


def whole_width_norm(sim: Sim, x: Tensor, weight: Tensor, width: int, opts: Options) -> Tensor:
    """OLMo 2's q_norm / k_norm over the whole projection (consumes x). Under sequence parallelism, as OLMo-core's
    plan runs it: the projection's output (this rank's heads) redistributed onto the sequence (an all-to-all), the
    norm run over every head on the rank's 1/tp of the tokens, and redistributed back onto the heads."""
    if opts.sequence_parallel == 1:
        return chain(sim, x, lambda sim_, t: rms_norm(sim_, t, weight, width, olmo=True))
    tokens = ops.all_to_all(sim, x)
    normed = rms_norm(sim, tokens, weight, width * opts.sequence_parallel, olmo=True)
    out = ops.all_to_all(sim, normed)
    sim.drop(normed, tokens, x)
    return out


def attend_and_project(
    sim: Sim, q: Tensor, k: Tensor, v: Tensor, p: LayerParams, d: Dims, opts: Options, *, copy_output: bool = False,
    head_major: bool = False,
) -> Tensor:
    """The attention core, then o_proj (head_major: see eager_attention)."""
    attn = attention_core(sim, q, k, v, d, opts, p.sinks, head_major=head_major)
    if copy_output and opts.attention == "flash":
        copied = ops.contiguous_copy(sim, attn)
        sim.drop(attn)
        attn = copied
    out = apply_linear(sim, attn, p, "o_proj", d.q_dim, d.hidden, opts)
    out = scatter_tokens(sim, out, opts)
    sim.drop(attn, q, k, v)
    return out


def scatter_tokens(sim: Sim, x: Tensor, opts: Options) -> Tensor:
    """RowwiseParallel(output Shard(1)) under sequence parallelism: the output reduce-scattered (consumes x)."""
    if opts.sequence_parallel == 1:
        return x
    out = ops.reduce_scatter_tokens(sim, x, opts.sequence_parallel)
    sim.drop(x)
    return out


def gather_tokens(sim: Sim, x: Tensor, opts: Options) -> Tensor:
    """PrepareModuleInput Shard(1) -> Replicate under sequence parallelism (a new reference either way)."""
    if opts.sequence_parallel == 1:
        return sim.ref(x)
    return ops.all_gather_tokens(sim, x, opts.sequence_parallel)


def attention_core(sim: Sim, q: Tensor, k: Tensor, v: Tensor, d: Dims, opts: Options, sinks: Tensor | None = None,
                   *, head_major: bool = False) -> Tensor:
    if sinks is not None:  # gpt-oss: eager attention whatever --attention says (EAGER_ONLY_FAMILIES)
        return eager_attention(sim, q, k, v, d, opts, sinks, head_major=True)
    if opts.attention == "flash":
        mask = getattr(sim, "window_mask", None) if opts.window_mask and not opts.full_attention_layers else None
        if mask is not None and opts.family == "gemma3" and d.heads > d.kv_heads:
            # sdpa_attention_forward uses SDPA's native GQA only without a mask: with one, repeat_kv copies k and v
            # to every head. With a single key/value head the reshape stays an expanded view, but autocast's cast
            # of it (fp32 RoPE output under -mixed) is a full-size tensor.
            repeat = ops.expand_view if d.kv_heads == 1 else ops.contiguous_copy
            k_full, v_full = repeat(sim, k, q.elems), repeat(sim, v, q.elems)
            out = ops.flash_attention(sim, q, k_full, v_full, d.heads, d.head_dim, mask)
            sim.drop(k_full, v_full)
            return out
        return ops.flash_attention(sim, q, k, v, d.heads, d.head_dim, mask)
    return eager_attention(sim, q, k, v, d, opts, head_major=head_major)


def eager_attention(sim: Sim, q: Tensor, k: Tensor, v: Tensor, d: Dims, opts: Options, sinks: Tensor | None = None,
                    *, head_major: bool = False) -> Tensor:
    """transformers' eager_attention_forward: repeat_kv, QK^T, mask, fp32 softmax, dropout, PV.

    matmul reshapes (b, heads, s, d) to (b * heads, s, d), which copies a tensor unless it is laid out head-major
    or there is one sequence (b = 1: the view's other strides serve bmm as they are). RoPE's outputs keep the
    token-major layout of the projections, and so do v and a GPT-2 split; repeat_kv's copies are head-major.
    `head_major`: q and k were made by a cat along the head dimension (Phi-3's partial-rotary RoPE, gpt-oss's, whose
    softmax also runs over the scores and a sink column `sinks`), so they are never copied.
    """
    groups = d.heads // d.kv_heads
    copies = opts.batched  # more than one sequence
    k_full = ops.contiguous_copy(sim, k, q.elems) if groups > 1 else sim.ref(k)
    v_full = ops.contiguous_copy(sim, v, q.elems) if groups > 1 else sim.ref(v)
    scores_elems = (0.0, 0.0, float(d.heads), 0.0, 0.0)  # b * heads * s * s
    k_operand = _bmm_operand(sim, k_full, needs_copy=groups == 1 and copies and not head_major)
    q_operand = _bmm_operand(sim, q, needs_copy=copies and not head_major)
    scores = ops.matmul(sim, q_operand, k_operand, scores_elems)
    sim.drop(q_operand, k_operand)
    scaled = ops.mul_scalar(sim, scores)
    sim.drop(scores)
    if opts.attention_softcap:
        scaled = softcap(sim, scaled)
    masked = ops.add(sim, scaled, sim.causal_mask)  # type: ignore[attr-defined]
    sim.drop(scaled)
    if sinks is not None:
        dropped, shifted = softmax_with_sinks(sim, masked, sinks, d, v.dtype)
        sim.drop(masked)  # `attn_weights` is rebound to the probabilities
    else:
        probs = ops.softmax(sim, masked, "f32" if opts.eager_softmax_f32 else None, per_token(d.heads))
        sim.drop(masked)
        probs_c = ops.cast(sim, probs, q.dtype)  # .to(query.dtype)
        sim.drop(probs)
        dropped = ops.dropout(sim, probs_c, opts.attention_dropout)
        sim.drop(probs_c)
        shifted = None
    p_operand = _bmm_operand(sim, dropped, needs_copy=False)
    v_operand = _bmm_operand(sim, v_full, needs_copy=groups == 1 and copies)
    out = ops.matmul(sim, p_operand, v_operand, q.elems)
    sim.drop(p_operand, v_operand, dropped)
    transposed = ops.contiguous_copy(sim, out)  # attn_output.transpose(1, 2).contiguous()
    sim.drop(out, k_full, v_full, shifted)
    return transposed


def softmax_with_sinks(sim: Sim, masked: Tensor, sinks: Tensor, d: Dims, value_dtype: str) -> tuple[Tensor, Tensor]:
    """gpt-oss's eager_attention_forward past the mask: cat the per-head sink as a last column, subtract the
    row max, softmax in that dtype, drop the sink column (a view), dropout (identity at 0), `.to(value dtype)`.
    Returns the probabilities and the shifted logits (held by `combined_logits` until the function returns)."""
    column = per_token(d.heads)  # (b, heads, s, 1)
    sink_column = ops.expand_view(sim, sinks, column)  # sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)
    combined = ops.cat(sim, [masked, sink_column], lf_add(masked.elems, column))
    sim.drop(sink_column)
    row_max = ops.topk(sim, combined, column)  # combined.max(dim=-1, keepdim=True).values
    shifted = ops.sub(sim, combined, row_max)
    sim.drop(combined, row_max)
    probs = ops.softmax(sim, shifted, shifted.dtype, column)
    scores = ops.slice_view(sim, probs, 1.0, masked.elems)  # probs[..., :-1]
    sim.drop(probs)
    out = ops.cast(sim, scores, value_dtype)
    sim.drop(scores)
    return out, shifted


def _bmm_operand(sim: Sim, x: Tensor, *, needs_copy: bool) -> Tensor:
    """matmul's operand: autocast's cast (layout kept), then a copy if bmm's reshape needs one."""
    cast = ops.autocast_operand(sim, x)
    if not needs_copy:
        return cast
    copy = ops.contiguous_copy(sim, cast)
    sim.drop(cast)
    return copy


def chain(sim: Sim, x: Tensor, *unary_ops) -> Tensor:
    """Apply unary ops in turn, each result rebinding the same Python variable (the input is consumed)."""
    for op in unary_ops:
        out = op(sim, x)
        sim.drop(x)
        x = out
    return x


def softcap(sim: Sim, x: Tensor) -> Tensor:
    """Gemma-2's soft-capping: x / cap, tanh, * cap (the input reference is consumed)."""
    return chain(sim, x, ops.mul_scalar, ops.tanh, ops.mul_scalar)


def moe_block(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """MixtralSparseMoeBlock and Qwen3MoeSparseMoeBlock with transformers' grouped_mm experts: the router, then
    every token's top-k copies sorted by expert, run through two grouped matmuls, weighted, put back in order and
    summed. The sizes do not depend on the routing (tokens x top_k rows in all), so the replay is exact whatever
    the router picks. The block holds the router's logits (`_`) until it returns."""
    routed = lf_scale(x.elems, d.top_k)  # (tokens * top_k, hidden)
    rows = lf_scale(x.elems, d.top_k / d.hidden)  # tokens * top_k
    router_logits, top_weights = topk_router(sim, x, p, d, opts, rows)
    local = local_expert_weights(sim, p, opts)
    out = grouped_experts(sim, x, p, d, top_weights, routed, rows, release=top_weights, local=local)
    sim.drop(router_logits)
    # under sequence parallelism each rank's experts hold 1/tp of the intermediate dimension: their sum is
    # partial, reduce-scattered onto the rank's tokens (torchtitan's MoE boundary)
    return scatter_tokens(sim, out, opts)


def local_expert_weights(sim: Sim, p: LayerParams, opts: Options) -> dict[str, Tensor]:
    """Under the traced MoE plan the experts run on their DTensor weights' local shards, taken (to_local) as the
    experts module is called: those views' backward nodes are older than every op of the experts, so each weight's
    new gradient waits in the engine's input buffer until the experts' backward is done, and only then reaches
    AccumulateGrad. In a step's only backward that gradient is the one kept, as large either way; only a later
    micro-batch's backward (a pipeline stage's, `sim.accumulating`), which adds it in place, sees it held."""
    if opts.sequence_parallel == 1 or not sim.accumulating:
        return {}
    names = [name for name in ("experts.gate_up_proj", "experts.down_proj") if name in p.linears]
    views = {name: ops.view(sim, p.linears[name]) for name in names}
    views.update({f"bias {name}": ops.view(sim, p.biases[name]) for name in names if name in p.biases})
    return views


def grouped_experts(sim: Sim, x: Tensor, p: LayerParams, d: Dims, top_weights: Tensor, routed, rows, *,
                    release: Tensor | None = None, local: dict[str, Tensor] | None = None) -> Tensor:
    """transformers' grouped_mm experts (grouped_mm_experts_forward), back in x's dtype: every token's top-k copies
    sorted by expert, each row's routing weight gathered from `top_weights`; `release` goes with the summed rows
    (the router's top-k weights, held by the caller until then); `local`: the weights' local views
    (local_expert_weights), let go with the experts' forward. The function's locals (the sort, the gathered rows,
    the counts for grouped_mm) stay referenced until it returns: with frozen experts (LoRA) grouped_mm saves
    none of the rows, and they are live at the block's end, the forward's peak when the experts are large."""
    local = local or {}
    # the sort's expert ids and permutation, and each row's token (perm // top_k): the gathers' indices
    expert_ids, perm = sim.new(rows, "i64", name="sorted expert ids"), sim.new(rows, "i64", name="sort permutation")
    token_of_row = sim.new(rows, "i64", name="token of each row")
    selected = ops.gather_rows(sim, x, routed, rows, token_of_row)
    sample_weights = ops.gather_rows(sim, top_weights, rows, rows, perm)
    # histc's input (the sorted ids as int32 on CUDA), the tokens per expert and their offsets, for grouped_mm
    counting = [sim.new(rows, "i32", name="histc input"),
                sim.new(const(d.experts), "f32", name="tokens per expert"),
                sim.new(const(d.experts), "i32", name="offsets")]
    gate_up = ops.grouped_mm(sim, selected, local.get("experts.gate_up_proj", p.linears["experts.gate_up_proj"]),
                             2 * d.intermediate, d.hidden)
    gate, up = ops.chunk(sim, gate_up, 2)
    sim.drop(gate_up)
    act = ops.silu(sim, gate)
    product = ops.mul(sim, act, up)
    sim.drop(act, gate, up)
    down = ops.grouped_mm(sim, product, local.get("experts.down_proj", p.linears["experts.down_proj"]), d.hidden,
                          d.intermediate)
    sim.drop(product)
    weighted = ops.mul(sim, down, sample_weights)
    inverse = sim.new(rows, "i64", name="inverse permutation")
    ordered = ops.gather_rows(sim, weighted, routed, rows, inverse)
    sim.drop(weighted)
    out = ops.sum_groups(sim, ordered, d.top_k)
    sim.drop(ordered, inverse, down, sample_weights, selected, expert_ids, perm, token_of_row, *counting, release,
             *local.values())
    return chain(sim, out, lambda sim_, t: ops.cast(sim_, t, x.dtype))


def topk_router(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, rows) -> tuple[Tensor, Tensor]:
    """MixtralTopKRouter and Qwen3MoeTopKRouter: logits, fp32 softmax over every expert, top-k, renormalised in
    place (Mixtral always, Qwen3-MoE with norm_topk_prob). Mixtral casts the logits to fp32 first (`.float()`) and
    keeps the weights fp32; Qwen3-MoE softmaxes with dtype=float and casts the weights back to the logits' dtype.
    Returns (logits, top-k weights). With 128 experts the (tokens, experts) tensors are not negligible."""
    mixtral = opts.family == "mixtral"
    router_logits = apply_linear(sim, x, p, "gate", d.hidden, d.experts, opts)
    if mixtral:
        logits = ops.cast(sim, router_logits, "f32")
        probs = ops.softmax(sim, logits, "f32", lf_scale(logits.elems, 1 / d.experts))
        sim.drop(logits)
    else:
        probs = ops.softmax(sim, router_logits, "f32", lf_scale(router_logits.elems, 1 / d.experts))
    top = ops.topk(sim, probs, rows)
    sim.drop(probs)
    if opts.norm_topk or mixtral:
        total = ops.sum_groups(sim, top, d.top_k)
        top = chain(sim, top, lambda sim_, t: ops.div_(sim_, t, total))
        sim.drop(total)
    if mixtral:
        return router_logits, top
    out = ops.cast(sim, top, router_logits.dtype)
    sim.drop(top)
    return router_logits, out


def llama_mlp(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, *, scatter: bool = True) -> Tensor:
    """LlamaMLP (SiLU) and GemmaMLP (GELU, tanh approximation): down(act(gate(x)) * up(x)); under sequence
    parallelism its output reduce-scattered, unless `scatter` is False (left partial for the caller)."""
    gate = apply_linear(sim, x, p, "gate_proj", d.hidden, d.intermediate, opts)
    act = ops.gelu_tanh(sim, gate) if opts.family in GEMMA_FAMILIES else ops.silu(sim, gate)
    sim.drop(gate)
    up = apply_linear(sim, x, p, "up_proj", d.hidden, d.intermediate, opts)
    product = ops.mul(sim, act, up)
    sim.drop(act, up)
    down = apply_linear(sim, product, p, "down_proj", d.intermediate, d.hidden, opts)
    if scatter:
        down = scatter_tokens(sim, down, opts)
    sim.drop(product)
    return down


# ---- Phi-3: fused qkv and gate_up projections ------------------------------------------------------
def phi3_attention(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """Phi3Attention.forward: one qkv projection sliced into q, k, v; RoPE on a rotary slice, then cat."""
    h = d.hidden
    width = d.q_dim + 2 * d.kv_dim
    qkv = apply_linear(sim, x, p, "qkv_proj", h, width, opts)
    # The three slices first, then their per-head views: backward runs the views' reshapes (each a copy of a
    # transposed gradient) before any slice's zero-filled gradient.
    parts = [ops.slice_view(sim, qkv, dim / width) for dim in (d.q_dim, d.kv_dim, d.kv_dim)]
    sim.drop(qkv)
    q, k, v = (ops.view_needing_copy_in_backward(sim, part) for part in parts)
    sim.drop(*parts)
    q_rope = _phi3_rope(sim, q, cos, sin)
    k_rope = _phi3_rope(sim, k, cos, sin)
    sim.drop(q, k)
    # The cat leaves q (b, h, s, d)-contiguous; FlashAttention's output is laid out like q (flash_api's
    # empty_like(q), as the CPU kernel's meta), so sdpa_attention_forward's transpose(1, 2).contiguous() copies it.
    # Compiled, inductor's cat decomposition drops the empty pass-through part (the whole head is rotated) and
    # returns the other, layout kept: q stays token-major like the projection, and so does SDPA's output, which
    # the transpose makes contiguous again: no copy, whatever the batch or mask (the traced graph has none).
    copy = not opts.compiled
    return attend_and_project(sim, q_rope, k_rope, v, p, d, opts, copy_output=copy, head_major=True)


def _phi3_rope(sim: Sim, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """cat([(x_rot * cos) + (rotate_half(x_rot) * sin), x_pass]) with x_rot the whole head (factor 1)."""
    rotary_part = ops.slice_view(sim, x, 1.0)
    passed = ops.slice_view(sim, x, 0.0)
    rotated = apply_rope(sim, rotary_part, cos, sin)
    out = ops.cat(sim, [rotated, passed], x.elems)
    sim.drop(rotated, rotary_part, passed)
    return out


def phi3_mlp(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """Phi3MLP.forward: gate_up projection, chunk, up * silu(gate), down."""
    gate_up = apply_linear(sim, x, p, "gate_up_proj", d.hidden, 2 * d.intermediate, opts)
    gate, up = ops.chunk(sim, gate_up, 2)
    sim.drop(gate_up)
    act = ops.silu(sim, gate)
    product = ops.mul(sim, up, act)
    sim.drop(act, gate, up)
    down = apply_linear(sim, product, p, "down_proj", d.intermediate, d.hidden, opts)
    down = scatter_tokens(sim, down, opts)
    sim.drop(product)
    return down


def gemma_layer(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """GemmaDecoderLayer, Gemma2DecoderLayer and Gemma3DecoderLayer (post-attention and post-MLP norms)."""
    gemma2 = opts.family in ("gemma2", "gemma3")
    normed = rms_norm(sim, x, p.norms[0], d.hidden, gemma=True)
    gathered = gather_tokens(sim, normed, opts)  # self_attn's input, held until it returns
    attn = llama_attention(sim, gathered, p, d, opts, cos, sin)
    sim.drop(gathered, normed)
    if gemma2:
        post = rms_norm(sim, attn, p.norms[1], d.hidden, gemma=True)
        sim.drop(attn)
        attn = post
    residual = ops.add(sim, x, attn)
    sim.drop(attn)
    normed = rms_norm(sim, residual, p.norms[2 if gemma2 else 1], d.hidden, gemma=True)
    gathered = gather_tokens(sim, normed, opts)
    mlp_out = llama_mlp(sim, gathered, p, d, opts)
    sim.drop(gathered, normed)
    if gemma2:
        post = rms_norm(sim, mlp_out, p.norms[3], d.hidden, gemma=True)
        sim.drop(mlp_out)
        mlp_out = post
    out = ops.add(sim, residual, mlp_out)
    sim.drop(mlp_out, residual)
    return out


def llama_layer(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """LlamaDecoderLayer.forward (Phi3DecoderLayer has the same shape)."""
    if opts.family in GEMMA_FAMILIES:
        return gemma_layer(sim, x, p, d, opts, cos, sin)
    if opts.family == "olmo2":
        return olmo2_layer(sim, x, p, d, opts, cos, sin)
    phi3 = opts.family == "phi3"
    gpt_oss = opts.family == "gpt_oss"  # GptOssRMSNorm multiplies by the weight before casting back, as OLMo 2's
    normed = rms_norm(sim, x, p.norms[0], d.hidden, olmo=gpt_oss)
    gathered = gather_tokens(sim, normed, opts)  # self_attn's input, held until it returns
    attention = phi3_attention if phi3 else gpt_oss_attention if gpt_oss else llama_attention
    attn = attention(sim, gathered, p, d, opts, cos, sin)
    sim.drop(gathered, normed)  # `hidden_states` is rebound only when self_attn returns
    residual = ops.add(sim, x, attn)
    sim.drop(attn)
    normed = rms_norm(sim, residual, p.norms[1], d.hidden, olmo=gpt_oss)
    mlp = gpt_oss_moe if gpt_oss else moe_block if opts.family in MOE_FAMILIES else phi3_mlp if phi3 else llama_mlp
    gathered = gather_tokens(sim, normed, opts)
    mlp_out = mlp(sim, gathered, p, d, opts)
    sim.drop(gathered, normed)
    out = ops.add(sim, residual, mlp_out)
    sim.drop(mlp_out, residual)
    return out


def llama_layer_params(sim: Sim, d: Dims, opts: Options) -> LayerParams:
    p = LayerParams()
    h = d.hidden
    if opts.family == "phi3":  # Phi3Attention defines o_proj before qkv_proj: model.parameters() order
        make_linear(sim, p, "o_proj", d.q_dim, h, opts, opts.o_bias)
        make_linear(sim, p, "qkv_proj", h, d.q_dim + 2 * d.kv_dim, opts, opts.qkv_bias)
        make_linear(sim, p, "gate_up_proj", h, 2 * d.intermediate, opts, opts.mlp_bias)
        make_linear(sim, p, "down_proj", d.intermediate, h, opts, opts.mlp_bias)
        p.norms = [norm_weight(sim, h, opts, "input_layernorm"), norm_weight(sim, h, opts, "post_attention_layernorm")]
        return p
    make_linear(sim, p, "q_proj", h, d.q_dim, opts, opts.qkv_bias)
    make_linear(sim, p, "k_proj", h, d.kv_dim, opts, opts.qkv_bias)
    make_linear(sim, p, "v_proj", h, d.kv_dim, opts, opts.qkv_bias)
    make_linear(sim, p, "o_proj", d.q_dim, h, opts, opts.o_bias)
    if opts.family == "gpt_oss":
        return gpt_oss_layer_params(sim, p, d, opts)
    if opts.family in MOE_FAMILIES:
        make_linear(sim, p, "gate", h, d.experts, opts, False)  # the router
        for name, d_in, d_out in (("experts.gate_up_proj", h, 2 * d.intermediate), ("experts.down_proj", d.intermediate, h)):
            make_linear(sim, p, name, d_in, d_out * d.experts, opts, False)
        p.norms = [norm_weight(sim, h, opts, "input_layernorm"), norm_weight(sim, h, opts, "post_attention_layernorm")]
        _qk_norm_weights(sim, p, d, opts)
        return p
    make_linear(sim, p, "gate_proj", h, d.intermediate, opts, opts.mlp_bias)
    make_linear(sim, p, "up_proj", h, d.intermediate, opts, opts.mlp_bias)
    make_linear(sim, p, "down_proj", d.intermediate, h, opts, opts.mlp_bias)
    p.norms = [norm_weight(sim, h, opts, "input_layernorm"), norm_weight(sim, h, opts, "post_attention_layernorm")]
    if opts.family in ("gemma2", "gemma3"):
        p.norms += [norm_weight(sim, h, opts, "pre_feedforward_layernorm"), norm_weight(sim, h, opts, "post_feedforward_layernorm")]
    _qk_norm_weights(sim, p, d, opts)
    return p


def _qk_norm_weights(sim: Sim, p: LayerParams, d: Dims, opts: Options) -> None:
    """q_norm and k_norm: per head (Qwen3, Qwen3-MoE, Gemma 3) or over the whole projection (OLMo 2)."""
    if opts.family not in QK_NORM_FAMILIES:
        return
    # OLMo 2's are over the whole projection, replicated under tensor parallelism
    ranks = opts.sequence_parallel
    q_width, k_width = (d.q_dim * ranks, d.kv_dim * ranks) if opts.family == "olmo2" else (d.head_dim, d.head_dim)
    p.qk_norms = [norm_weight(sim, q_width, opts, "q_norm"), norm_weight(sim, k_width, opts, "k_norm")]


def olmo2_layer(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """Olmo2DecoderLayer.forward: no pre-norms; attention and MLP outputs are normalised before each residual add
    (under sequence parallelism on the rank's 1/tp of the tokens, each module's input all-gathered)."""
    parallel = opts.sequence_parallel > 1
    gathered = gather_tokens(sim, x, opts) if parallel else x  # self_attn's input, held until it returns
    attn = llama_attention(sim, gathered, p, d, opts, cos, sin)
    if parallel:
        sim.drop(gathered)
    attn = chain(sim, attn, lambda sim_, t: rms_norm(sim_, t, p.norms[0], d.hidden, olmo=True))
    residual = ops.add(sim, x, attn)
    sim.drop(attn)
    gathered = gather_tokens(sim, residual, opts) if parallel else residual
    mlp_out = llama_mlp(sim, gathered, p, d, opts)
    if parallel:
        sim.drop(gathered)
    mlp_out = chain(sim, mlp_out, lambda sim_, t: rms_norm(sim_, t, p.norms[1], d.hidden, olmo=True))
    out = ops.add(sim, residual, mlp_out)
    sim.drop(mlp_out, residual)
    return out


def rotary(sim: Sim, d: Dims, dtype: str, width: int = 0) -> tuple[Tensor, Tensor]:
    """LlamaRotaryEmbedding.forward under no_grad: (1, s, head_dim) cos and sin in the hidden states' dtype
    (`width`: gpt-oss's are head_dim / 2 wide, the frequencies not repeated). As transformers computes them:
    freqs = position_ids[..., None].float() * inv_freq; emb = cat(freqs, freqs); cos = emb.cos() * scaling (and
    sin alike); returned cast to the dtype, the fp32 ones let go as it returns."""
    repeated = not width
    width = width or d.head_dim
    positions = sim.new(per_position(1), "f32", name="rope positions")
    freqs = sim.new(per_position(width / 2 if repeated else width), "f32", name="rope freqs")
    sim.drop(positions)
    emb = sim.new(per_position(width), "f32", name="rope emb") if repeated else freqs
    scaled = []
    for name in ("cos", "sin"):
        raw = sim.new(per_position(width), "f32", name=f"rope {name}")
        scaled.append(sim.new(per_position(width), "f32", name=f"rope {name} scaled"))
        sim.drop(raw)
    cos, sin = scaled
    if dtype != "f32":
        cos = sim.new(per_position(width), dtype, name="rope cos cast")
        sin = sim.new(per_position(width), dtype, name="rope sin cast")
        sim.drop(*scaled)
    sim.drop(freqs)
    if repeated:
        sim.drop(emb)
    return cos, sin


# ---- gpt-oss: attention sinks, half-width RoPE, biased experts with a clamped SwiGLU -------------------------
def gpt_oss_layer_params(sim: Sim, p: LayerParams, d: Dims, opts: Options) -> LayerParams:
    """GptOssDecoderLayer's parameters after q, k, v, o: the sinks, the router (weight and bias: Parameters,
    not an nn.Linear, so never quantized), the experts' stacked weights and biases, two norms."""
    h = d.hidden
    p.sinks = norm_weight(sim, d.heads, opts, "sinks")
    make_linear(sim, p, "router", h, d.experts, opts, True)
    p.linears["router"].quantized = False  # type: ignore[attr-defined]
    for name, d_in, d_out in (("experts.gate_up_proj", h, 2 * d.intermediate), ("experts.down_proj", d.intermediate, h)):
        make_linear(sim, p, name, d_in, d_out * d.experts, opts, True)
    p.norms = [norm_weight(sim, h, opts, "input_layernorm"), norm_weight(sim, h, opts, "post_attention_layernorm")]
    return p


def gpt_oss_rope(sim: Sim, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """gpt-oss's _apply_rotary_emb: halves by chunk, first * cos - second * sin and second * cos + first * sin,
    then cat (a new tensor, laid out head-major)."""
    first, second = ops.chunk(sim, x, 2)
    halves = []
    for a, b, combine in ((first, second, ops.sub), (second, first, ops.add)):
        with_cos = ops.mul(sim, a, cos)
        with_sin = ops.mul(sim, b, sin)
        halves.append(combine(sim, with_cos, with_sin))
        sim.drop(with_cos, with_sin)
    out = ops.cat(sim, halves, x.elems)
    sim.drop(*halves, first, second)
    return out


def gpt_oss_attention(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """GptOssAttention.forward: biased projections, RoPE, eager attention with the sinks, o_proj."""
    h = d.hidden
    q_lin = apply_linear(sim, x, p, "q_proj", h, d.q_dim, opts)
    q = ops.view_needing_copy_in_backward(sim, q_lin)
    k_lin = apply_linear(sim, x, p, "k_proj", h, d.kv_dim, opts)
    k = ops.view_needing_copy_in_backward(sim, k_lin)
    v_lin = apply_linear(sim, x, p, "v_proj", h, d.kv_dim, opts)
    v = ops.view(sim, v_lin)
    sim.drop(q_lin, k_lin, v_lin)
    q_rope = gpt_oss_rope(sim, q, cos, sin)
    k_rope = gpt_oss_rope(sim, k, cos, sin)
    sim.drop(q, k)
    return attend_and_project(sim, q_rope, k_rope, v, p, d, opts)


def gpt_oss_moe(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """GptOssMLP: GptOssTopKRouter (biased logits, top-k, softmax over the k), then transformers' grouped_mm
    experts (the default experts implementation): every token's k copies sorted by expert, the biases gathered
    per row and added in place, the clamped SwiGLU, weighted, put back in order and summed. Sizes are
    tokens x top_k rows whatever the routing."""
    routed = lf_scale(x.elems, d.top_k)  # (tokens * top_k, hidden)
    rows = lf_scale(x.elems, d.top_k / d.hidden)  # tokens * top_k
    logits = apply_linear(sim, x, p, "router", d.hidden, d.experts, opts)
    top = ops.topk(sim, logits, rows)  # the logits, the router's first output, held by the block (`_`)
    scores = ops.softmax(sim, top, top.dtype, lf_scale(x.elems, 1 / d.hidden))  # over each token's top k
    sim.drop(top)
    local = local_expert_weights(sim, p, opts)
    weight = {name: local.get(name, p.linears[name]) for name in ("experts.gate_up_proj", "experts.down_proj")}
    bias = {name: local.get(f"bias {name}", p.biases[name]) for name in ("experts.gate_up_proj", "experts.down_proj")}
    # the sort's expert ids and permutation, and each row's token (perm // top_k): the gathers' indices
    expert_ids, perm = sim.new(rows, "i64", name="sorted expert ids"), sim.new(rows, "i64", name="sort permutation")
    token_of_row = sim.new(rows, "i64", name="token of each row")
    order = [expert_ids, perm, token_of_row]
    selected = ops.gather_rows(sim, x, routed, rows, token_of_row)
    sample_weights = ops.gather_rows(sim, scores, rows, rows, perm)
    # histc's input (the sorted ids as int32 on CUDA), the tokens per expert and their offsets, for grouped_mm
    counting = [sim.new(rows, "i32", name="histc input"),
                sim.new(const(d.experts), "f32", name="tokens per expert"),
                sim.new(const(d.experts), "i32", name="offsets")]
    selected_c = ops.cast(sim, selected, p.linears["experts.gate_up_proj"].dtype)
    up_bias = ops.gather_rows(sim, bias["experts.gate_up_proj"], lf_scale(routed, 2 * d.intermediate / d.hidden),
                              rows, expert_ids)
    gate_up = ops.grouped_mm(sim, selected_c, weight["experts.gate_up_proj"], 2 * d.intermediate, d.hidden)
    gate_up = chain(sim, gate_up, lambda sim_, t: ops.add_(sim_, t, up_bias))
    gated = clamped_swiglu(sim, gate_up)
    sim.drop(gate_up)
    down_bias = ops.gather_rows(sim, bias["experts.down_proj"], routed, rows, expert_ids)
    sim.drop(up_bias)  # `selected_biases` rebound
    down = ops.grouped_mm(sim, gated, weight["experts.down_proj"], d.hidden, d.intermediate)
    sim.drop(gated)
    down = chain(sim, down, lambda sim_, t: ops.add_(sim_, t, down_bias))
    weighted = ops.mul(sim, down, sample_weights)
    inverse = sim.new(rows, "i64", name="inverse permutation")
    ordered = ops.gather_rows(sim, weighted, routed, rows, inverse)
    sim.drop(weighted)
    out = ops.sum_groups(sim, ordered, d.top_k)
    sim.drop(ordered, inverse, down, down_bias, sample_weights, selected_c, selected, scores, *order, *counting, logits,
             *local.values())
    out = chain(sim, out, lambda sim_, t: ops.cast(sim_, t, x.dtype))
    return scatter_tokens(sim, out, opts)  # each rank's partial sum, reduce-scattered (as moe_block's)


def clamped_swiglu(sim: Sim, gate_up: Tensor) -> Tensor:
    """GptOssExperts._apply_gate: interleaved gate and up (strided views), gate clamped above, up both sides,
    (up + 1) * gate * sigmoid(gate * alpha)."""
    gate_view, up_view = ops.slice_view(sim, gate_up, 0.5), ops.slice_view(sim, gate_up, 0.5)
    gate = ops.clamp(sim, gate_view)
    up = ops.clamp(sim, up_view)
    sim.drop(gate_view, up_view)
    scaled = ops.mul_scalar(sim, gate)
    sigmoid = ops.sigmoid(sim, scaled)
    sim.drop(scaled)
    glu = ops.mul(sim, gate, sigmoid)
    sim.drop(sigmoid)
    up_plus_one = ops.add_scalar(sim, up)
    out = ops.mul(sim, up_plus_one, glu)
    sim.drop(up_plus_one, glu, gate, up)
    return out


# ---- GPT-2: Conv1D projections with biases, LayerNorm, dropouts, learned positions, gelu_new ------------
def gpt2_layer_params(sim: Sim, d: Dims, opts: Options) -> LayerParams:
    p = LayerParams()
    h = d.hidden
    # Under tensor parallelism c_attn's columns and c_proj's rows are this rank's heads (d.q_dim: hidden / tp)
    make_linear(sim, p, "c_attn", h, 3 * d.q_dim, opts, True)
    make_linear(sim, p, "attn.c_proj", d.q_dim, h, opts, True)
    make_linear(sim, p, "c_fc", h, d.intermediate, opts, True)
    make_linear(sim, p, "mlp.c_proj", d.intermediate, h, opts, True)
    # ln_1 and ln_2: weight and bias each
    p.norms = [norm_weight(sim, h, opts, name) for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")]
    return p


def gpt2_attention(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """GPT2Attention.forward: c_attn, split into q, k, v (one SplitBackward), attention, c_proj, dropout."""
    h = d.hidden
    qkv = apply_linear(sim, x, p, "c_attn", h, 3 * d.q_dim, opts)
    parts = ops.chunk(sim, qkv, 3)
    sim.drop(qkv)
    q = ops.view_needing_copy_in_backward(sim, parts[0])
    k = ops.view_needing_copy_in_backward(sim, parts[1])
    v = ops.view(sim, parts[2])
    sim.drop(*parts)
    attn = attention_core(sim, q, k, v, d, opts)
    projected = scatter_tokens(sim, apply_linear(sim, attn, p, "attn.c_proj", d.q_dim, h, opts), opts)
    sim.drop(attn, q, k, v)
    out = ops.dropout(sim, projected, opts.residual_dropout)
    sim.drop(projected)
    return out


def gelu_new(sim: Sim, x: Tensor) -> Tensor:
    """NewGELUActivation in Python ops: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    half = ops.mul_scalar(sim, x)
    cubed = ops.pow_(sim, x)
    scaled = ops.mul_scalar(sim, cubed)
    sim.drop(cubed)
    inner = ops.add(sim, x, scaled)
    sim.drop(scaled)
    one_plus = chain(sim, inner, ops.mul_scalar, ops.tanh, ops.add_scalar)
    out = ops.mul(sim, half, one_plus)
    sim.drop(half, one_plus)
    return out


def gpt2_mlp(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    hidden = apply_linear(sim, x, p, "c_fc", d.hidden, d.intermediate, opts)
    activated = gelu_new(sim, hidden)
    sim.drop(hidden)
    projected = scatter_tokens(sim, apply_linear(sim, activated, p, "mlp.c_proj", d.intermediate, d.hidden, opts), opts)
    sim.drop(activated)
    out = ops.dropout(sim, projected, opts.residual_dropout)
    sim.drop(projected)
    return out


def gpt2_layer(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """GPT2Block.forward (under sequence parallelism the norms on the rank's 1/tp of the tokens, each module's input
    all-gathered and held until it returns)."""
    normed = ops.layer_norm(sim, x, p.norms[0], p.norms[1], d.hidden)
    gathered = gather_tokens(sim, normed, opts)
    attn = gpt2_attention(sim, gathered, p, d, opts)
    sim.drop(gathered)
    residual = ops.add(sim, attn, x)
    sim.drop(normed)  # `hidden_states` (ln_1's output) is rebound by the add; `attn_output` lives to the return
    normed = ops.layer_norm(sim, residual, p.norms[2], p.norms[3], d.hidden)
    gathered = gather_tokens(sim, normed, opts)
    mlp_out = gpt2_mlp(sim, gathered, p, d, opts)
    sim.drop(gathered)
    out = ops.add(sim, residual, mlp_out)
    sim.drop(normed, mlp_out, residual, attn)  # the block's locals, as it returns
    return out
