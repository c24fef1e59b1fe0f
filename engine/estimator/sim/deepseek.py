"""DeepSeek-V3 (transformers' DeepseekV3ForCausalLM) as a tensor program for the replay.

Multi-head latent attention: queries through a low-rank projection and its norm (or one projection without
q_lora_rank), keys and values from one compressed latent (kv_lora_rank) plus a single rotary key shared by every
head; RoPE on the interleaved rotary halves; the keys assembled in a new tensor; SDPA with values narrower than the
queries (CUDA's memory-efficient kernel). The first first_k_dense_replace layers have a dense MLP, the others
the MoE: a sigmoid router in fp32 with grouped top-k and a bias for choosing, the routed experts (grouped_mm)
and the shared experts' MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memtui.engine.estimator.sim import ops
from memtui.engine.estimator.sim.core import Sim, Tensor, lf_scale, per_token
from memtui.engine.estimator.sim.families import (
    Dims,
    LayerParams,
    Options,
    apply_linear,
    attention_core,
    chain,
    gather_tokens,
    grouped_experts,
    local_expert_weights,
    llama_mlp,
    make_linear,
    norm_weight,
    rms_norm,
    scatter_tokens,
)
from memtui.engine.model.architectures import ModelSpec, deepseek_value


@dataclass(frozen=True)
class LatentDims:
    """Multi-head latent attention's widths and the MLPs' sizes of a DeepSeek-V3 layer."""

    q_rank: int  # 0: one q_proj (q_lora_rank null)
    kv_rank: int
    nope: int  # qk_nope_head_dim
    rope: int  # qk_rope_head_dim
    value: int  # v_head_dim
    dense_intermediate: int
    shared_intermediate: int
    groups: int  # n_group
    topk_groups: int

    @property
    def qk_head(self) -> int:
        return self.nope + self.rope


def latent_dims(spec: ModelSpec, tp: int = 1) -> LatentDims:
    """The widths on one rank: under tensor parallelism the dense and shared MLPs hold 1/tp of their intermediate
    size (Colwise/Rowwise); the low-rank projections are replicated."""
    config = spec.config
    return LatentDims(
        q_rank=deepseek_value(config, "q_lora_rank") or 0, kv_rank=deepseek_value(config, "kv_lora_rank"),
        nope=deepseek_value(config, "qk_nope_head_dim"), rope=deepseek_value(config, "qk_rope_head_dim"),
        value=deepseek_value(config, "v_head_dim"), dense_intermediate=int(config["intermediate_size"]) // tp,
        shared_intermediate=spec.intermediate_size * deepseek_value(config, "n_shared_experts") // tp,
        groups=deepseek_value(config, "n_group"), topk_groups=deepseek_value(config, "topk_group"))


def deepseek_layer_params(sim: Sim, d: Dims, opts: Options, *, dense: bool) -> LayerParams:
    """DeepseekV3DecoderLayer's parameters, in module order (attention, MLP, then the layer norms)."""
    m: LatentDims = d.latent  # type: ignore[assignment]
    p = LayerParams()
    h, heads = d.hidden, d.heads
    if m.q_rank:
        make_linear(sim, p, "q_a_proj", h, m.q_rank, opts, opts.o_bias)  # attention_bias, as o_proj's
        p.qk_norms.append(norm_weight(sim, m.q_rank, opts, "q_a_layernorm"))
        make_linear(sim, p, "q_b_proj", m.q_rank, heads * m.qk_head, opts, False)
    else:
        make_linear(sim, p, "q_proj", h, heads * m.qk_head, opts, False)
    make_linear(sim, p, "kv_a_proj_with_mqa", h, m.kv_rank + m.rope, opts, opts.o_bias)
    p.qk_norms.append(norm_weight(sim, m.kv_rank, opts, "kv_a_layernorm"))
    make_linear(sim, p, "kv_b_proj", m.kv_rank, heads * (m.nope + m.value), opts, False)
    make_linear(sim, p, "o_proj", heads * m.value, h, opts, opts.o_bias)
    if dense:
        intermediate = m.dense_intermediate
    else:
        make_linear(sim, p, "experts.gate_up_proj", h, 2 * d.intermediate * d.experts, opts, False)
        make_linear(sim, p, "experts.down_proj", d.intermediate, h * d.experts, opts, False)
        make_linear(sim, p, "gate", h, d.experts, opts, False)  # the router's weight (not a LoRA target)
        intermediate = m.shared_intermediate
    for name, d_in, d_out in (("gate_proj", h, intermediate), ("up_proj", h, intermediate),
                              ("down_proj", intermediate, h)):
        make_linear(sim, p, name, d_in, d_out, opts, False)
    p.norms = [norm_weight(sim, h, opts, "input_layernorm"), norm_weight(sim, h, opts, "post_attention_layernorm")]
    return p


def _interleaved_rope(sim: Sim, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rotary_pos_emb_interleave on one tensor: the even and odd halves (strided views) against the first
    half of cos and sin, cat([x1 cos - x2 sin, x2 cos + x1 sin]). Each product saves cos or sin (views)."""
    half_cos, half_sin = ops.slice_view(sim, cos, 0.5), ops.slice_view(sim, sin, 0.5)
    first, second = ops.slice_view(sim, x, 0.5), ops.slice_view(sim, x, 0.5)
    parts = []
    for a, b, c, e in ((first, half_cos, second, half_sin), (second, half_cos, first, half_sin)):
        left = ops.mul(sim, a, b)
        right = ops.mul(sim, c, e)
        parts.append(ops.add(sim, left, right))  # sub or add: the same allocation
        sim.drop(left, right)
    out = ops.cat(sim, parts, x.elems)
    sim.drop(*parts, first, second, half_cos, half_sin)
    return out


def _copy_into_slice_backward(sim: Sim, node, grad):
    """CopySlices: the gradient is cloned (the slice's part zeroed); the copied source gets the slice's gradient
    (summed back over the heads for the expanded rotary key)."""
    source = node.inputs[1]
    rest = sim.new(grad.elems, grad.dtype, name="copy_slices clone")
    part = sim.new(source.elems, grad.dtype, name="copy_ slice grad")
    results = [(source, part)]
    if node.inputs[0].requires_grad:
        results.insert(0, (node.inputs[0], rest))
    else:
        sim.drop(rest)
    return results


def latent_attention(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """DeepseekV3Attention.forward; its locals (the projections, the rotary parts) live until it returns."""
    m: LatentDims = d.latent  # type: ignore[assignment]
    h, heads = d.hidden, d.heads
    if m.q_rank:
        q_low = apply_linear(sim, x, p, "q_a_proj", h, m.q_rank, opts)
        q_low = chain(sim, q_low, lambda sim_, t: rms_norm(sim_, t, p.qk_norms[0], m.q_rank))
        q_states = apply_linear(sim, q_low, p, "q_b_proj", m.q_rank, heads * m.qk_head, opts)
        sim.drop(q_low)
    else:
        q_states = apply_linear(sim, x, p, "q_proj", h, heads * m.qk_head, opts)
    q_pass = ops.slice_view(sim, q_states, m.nope / m.qk_head)
    q_rot = ops.slice_view(sim, q_states, m.rope / m.qk_head)
    compressed = apply_linear(sim, x, p, "kv_a_proj_with_mqa", h, m.kv_rank + m.rope, opts)
    kv_latent = ops.slice_view(sim, compressed, m.kv_rank / (m.kv_rank + m.rope))
    k_rot = ops.slice_view(sim, compressed, m.rope / (m.kv_rank + m.rope))
    kv_latent = chain(sim, kv_latent, lambda sim_, t: rms_norm(sim_, t, p.qk_norms[-1], m.kv_rank))
    q_rot = chain(sim, q_rot, lambda sim_, t: _interleaved_rope(sim_, t, cos, sin))
    k_rot = chain(sim, k_rot, lambda sim_, t: _interleaved_rope(sim_, t, cos, sin))
    query = ops.cat(sim, [q_pass, q_rot], lf_scale(q_states.elems, 1.0))
    # expand_kv: kv_b_proj, split into k_nope and the values (views), keys assembled in a new tensor
    kv = apply_linear(sim, kv_latent, p, "kv_b_proj", m.kv_rank, heads * (m.nope + m.value), opts)
    k_nope = ops.slice_view(sim, kv, m.nope / (m.nope + m.value))
    value = ops.slice_view(sim, kv, m.value / (m.nope + m.value))
    key = sim.new(query.elems, kv.dtype, name="key_states new_empty")
    for part in (k_nope, ops.expand_view(sim, k_rot, lf_scale(k_rot.elems, heads))):
        filled = sim.alias(key)
        sim.record("copy_slices", filled, [key, part], [], _copy_into_slice_backward)
        sim.drop(key, part)
        key = filled
    if opts.attention == "eager":
        attn = _latent_eager_attention(sim, query, key, value, d, opts)
    else:
        attn = attention_core(sim, query, key, value, replace(d, head_dim=m.qk_head), opts)
    out = apply_linear(sim, attn, p, "o_proj", heads * m.value, h, opts)
    out = scatter_tokens(sim, out, opts)
    sim.drop(attn, q_pass, q_states, q_rot, compressed, k_rot, query, kv, key, value, kv_latent)
    return out


def _latent_eager_attention(sim: Sim, q: Tensor, k: Tensor, v: Tensor, d: Dims, opts: Options) -> Tensor:
    """eager_attention_forward on latent attention's tensors: the queries (a cat) and keys (a new tensor) are laid
    out for bmm as they are; the values, a slice of kv_b_proj's token-major output, are copied by matmul's reshape
    when there is more than one sequence (with one, the slice itself is saved, holding kv_b_proj's output). The
    output has the values' width."""
    scores_elems = (0.0, 0.0, float(d.heads), 0.0, 0.0)  # b * heads * s * s
    k_operand = ops.autocast_operand(sim, k)
    q_operand = ops.autocast_operand(sim, q)
    scores = ops.matmul(sim, q_operand, k_operand, scores_elems)
    sim.drop(q_operand, k_operand)
    scaled = chain(sim, scores, ops.mul_scalar)
    masked = ops.add(sim, scaled, sim.causal_mask)  # type: ignore[attr-defined]
    sim.drop(scaled)
    probs = ops.softmax(sim, masked, "f32", per_token(d.heads))
    sim.drop(masked)
    probs = chain(sim, probs, lambda sim_, t: ops.cast(sim_, t, q.dtype))  # .to(query.dtype)
    p_operand = ops.autocast_operand(sim, probs)
    v_operand = ops.autocast_operand(sim, v)
    if opts.batched:
        v_operand = chain(sim, v_operand, ops.contiguous_copy)
    out = ops.matmul(sim, p_operand, v_operand, lf_scale(q.elems, sum(v.elems) / sum(k.elems)))
    sim.drop(p_operand, v_operand, probs)
    return chain(sim, out, ops.contiguous_copy)  # attn_output.transpose(1, 2).contiguous()


def deepseek_router(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, rows) -> tuple[Tensor, Tensor]:
    """DeepseekV3TopkRouter.forward: an fp32 linear (input and weight cast to fp32), sigmoid, the bias for choosing,
    grouped top-k, the chosen scores gathered, renormalised (norm_topk_prob) and scaled. Returns (logits, weights):
    the caller keeps both until the MoE block returns."""
    m: LatentDims = d.latent  # type: ignore[assignment]
    tokens = lf_scale(x.elems, 1 / d.hidden)
    scores_elems = lf_scale(tokens, d.experts)
    x32 = ops.cast(sim, x, "f32")
    w32 = ops.cast(sim, p.linears["gate"], "f32")
    logits = ops.linear(sim, x32, w32, d.experts, d.hidden)
    sim.drop(x32, w32)
    scores = ops.sigmoid(sim, logits)
    # Choosing (+ e_score_correction_bias, grouped top-k, masking, top-k) makes only tensors whose autograd graph
    # dies with them (top-k's values are dropped): plain allocations, all freed when the router returns.
    for_choice = sim.new(scores_elems, "f32", name="scores for choice")
    best_two = sim.new(lf_scale(tokens, 2 * m.groups), "f32", name="group top-2")
    best_two_index = sim.new(lf_scale(tokens, 2 * m.groups), "i64", name="group top-2 indices")
    group_scores = sim.new(lf_scale(tokens, m.groups), "f32", name="group scores")
    sim.drop(best_two)
    group_index = sim.new(lf_scale(tokens, m.topk_groups), "i64", name="group topk indices")
    group_mask = sim.new(lf_scale(tokens, m.groups), "f32", name="group mask")
    expanded = sim.new(scores_elems, "f32", name="score mask reshape") if m.groups > 1 else None
    as_bool = sim.new(scores_elems, "bool", name="score mask bool")
    inverted = sim.new(scores_elems, "bool", name="score mask not")
    sim.drop(as_bool)
    masked = sim.new(scores_elems, "f32", name="masked scores")
    sim.drop(for_choice)
    top_values = sim.new(rows, "f32", name="topk values")
    chosen = sim.new(rows, "i64", name="topk indices")
    sim.drop(top_values)
    weights = ops.gather_columns(sim, scores, chosen, rows)
    sim.drop(chosen)
    if opts.norm_topk:
        total = ops.sum_groups(sim, weights, d.top_k)
        denominator = chain(sim, total, ops.add_scalar)
        weights = chain(sim, weights, lambda sim_, t: ops.div_(sim_, t, denominator))
        sim.drop(denominator)
    weights = chain(sim, weights, ops.mul_scalar)  # * routed_scaling_factor
    sim.drop(scores, expanded, inverted, masked, best_two_index, group_scores, group_index, group_mask)
    return logits, weights


def deepseek_moe(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """DeepseekV3MoE.forward: the router, the routed experts (their weights fp32, so the weighted rows are fp32),
    plus the shared experts' MLP on the same input."""
    m: LatentDims = d.latent  # type: ignore[assignment]
    routed = lf_scale(x.elems, d.top_k)
    rows = lf_scale(x.elems, d.top_k / d.hidden)
    logits, top_weights = deepseek_router(sim, x, p, d, opts, rows)
    local = local_expert_weights(sim, p, opts)
    experts = grouped_experts(sim, x, p, d, top_weights, routed, rows, local=local)
    # the shared experts' partial output (RowwiseParallel to Partial) is summed with the routed experts' before the
    # block's one reduce-scatter under sequence parallelism
    shared = llama_mlp(sim, x, p, replace(d, intermediate=m.shared_intermediate), opts, scatter=False)
    out = ops.add(sim, experts, shared)
    sim.drop(shared, experts, logits, top_weights)
    return scatter_tokens(sim, out, opts)


def deepseek_layer(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor, *,
                   dense: bool) -> Tensor:
    """DeepseekV3DecoderLayer.forward: pre-norm attention and MLP (dense or MoE) with residuals."""
    normed = rms_norm(sim, x, p.norms[0], d.hidden)
    gathered = gather_tokens(sim, normed, opts)
    attn = latent_attention(sim, gathered, p, d, opts, cos, sin)
    sim.drop(gathered, normed)
    residual = ops.add(sim, x, attn)
    sim.drop(attn)
    normed = rms_norm(sim, residual, p.norms[1], d.hidden)
    m: LatentDims = d.latent  # type: ignore[assignment]
    gathered = gather_tokens(sim, normed, opts)
    mlp_out = (llama_mlp(sim, gathered, p, replace(d, intermediate=m.dense_intermediate), opts)
               if dense else deepseek_moe(sim, gathered, p, d, opts))
    sim.drop(gathered, normed)
    out = ops.add(sim, residual, mlp_out)
    sim.drop(mlp_out, residual)
    return out
