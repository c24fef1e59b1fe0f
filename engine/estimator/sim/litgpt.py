"""LitGPT's GPT as a tensor program for the replay (--modeling litgpt).

Mirrors litgpt/model.py and litgpt/lora.py at Lightning-AI/litgpt 26857050fe3ff627cd714fe92f5838f51a3d5efa for
its Llama-shaped configs (Llama 2/3, Mistral, TinyLlama): Block, CausalSelfAttention with one fused qkv Linear
whose split views q, k and v are (so SDPA's saved v, a view, keeps the whole qkv output alive), LitGPT's RoPE
(fp32 cos/sin buffers: the rotation runs in fp32 and is cast back), repeat_interleave for grouped queries,
LLaMAMLP, LitGPT's RMSNorm, and the LoRA layers: LoRAQKVLinear (one lora_A for the enabled slices, a grouped
conv1d for lora_B, zero-padded to the qkv width) and LoRALinear. The traced counterpart is
memtui.engine.torchside.litgpt.
"""

from __future__ import annotations

from memtui.engine.estimator.sim import families, ops
from memtui.engine.estimator.sim.core import Sim, Tensor, const, lf_scale, per_position_sq
from memtui.engine.estimator.sim.families import Dims, LayerParams, Options, attention_core, norm_weight

QKV = ("q_proj", "k_proj", "v_proj")


def qkv_slices(d: Dims, opts: Options) -> tuple[int, ...]:
    """The widths of the qkv slices LoRA adapts (litgpt/lora.py:236 qkv_shapes), in q, k, v order."""
    return tuple(width for name, width in zip(QKV, (d.q_dim, d.kv_dim, d.kv_dim)) if name in opts.lora_targets)


def _linear(sim: Sim, p: LayerParams, name: str, d_in: int, d_out: int, opts: Options, *, adapted: bool,
            rank_in: int = 0, rank_out: int = 0) -> None:
    """A LoRALinear's nn.Linear, then its lora_A (r x in) and lora_B (out x r) (litgpt/lora.py:121-126)."""
    frozen = opts.lora_rank > 0
    p.linears[name] = sim.parameter(const(d_in * d_out), opts.base if frozen else opts.params, name=name,
                                    trainable=not frozen)
    p.linears[name].shape = (d_out, d_in)  # type: ignore[attr-defined]
    if adapted:
        a = sim.parameter(const((rank_in or opts.lora_rank) * d_in), opts.lora_dtype, name=name + ".lora_A",
                          trainable=True)
        b = sim.parameter(const((rank_out or d_out) * opts.lora_rank), opts.lora_dtype, name=name + ".lora_B",
                          trainable=True)
        p.lora[name] = (a, b)


def litgpt_layer_params(sim: Sim, d: Dims, opts: Options) -> LayerParams:
    """Block's parameters in registration order: norm_1, attn.qkv, attn.proj, norm_2, mlp.fc_1, fc_2, proj."""
    p = LayerParams()
    h = d.hidden
    p.norms = [norm_weight(sim, h, opts, "norm_1")]
    slices = qkv_slices(d, opts) if opts.lora_rank > 0 else ()
    _linear(sim, p, "qkv", h, d.q_dim + 2 * d.kv_dim, opts, adapted=bool(slices),
            rank_in=opts.lora_rank * len(slices), rank_out=sum(slices))
    _linear(sim, p, "o_proj", d.q_dim, h, opts, adapted="o_proj" in opts.lora_targets)
    p.norms.append(norm_weight(sim, h, opts, "norm_2"))
    mlp = "gate_proj" in opts.lora_targets  # lora_mlp: the three together (validation checks)
    _linear(sim, p, "gate_proj", h, d.intermediate, opts, adapted=mlp)
    _linear(sim, p, "up_proj", h, d.intermediate, opts, adapted=mlp)
    _linear(sim, p, "down_proj", d.intermediate, h, opts, adapted=mlp)
    return p


def rms_norm(sim: Sim, x: Tensor, weight: Tensor, width: int) -> Tensor:
    """litgpt/model.py:1315 RMSNorm.forward."""
    return families.rms_norm(sim, x, weight, width, litgpt=True)


def lora_linear(sim: Sim, x: Tensor, p: LayerParams, name: str, d_in: int, d_out: int, opts: Options) -> Tensor:
    """litgpt/lora.py:165 LoRALinear.forward: linear(x) + (dropout(x) @ A.T @ B.T) * scaling."""
    pretrained = ops.linear(sim, x, p.linears[name], d_out, d_in)
    if name not in p.lora:
        return pretrained
    lora_a, lora_b = p.lora[name]
    dropped = ops.dropout(sim, x, opts.lora_dropout)
    hidden = ops.linear(sim, dropped, lora_a, opts.lora_rank, d_in)
    sim.drop(dropped)
    delta = ops.linear(sim, hidden, lora_b, d_out, opts.lora_rank)
    sim.drop(hidden)
    return add_scaled(sim, pretrained, delta)


def add_scaled(sim: Sim, pretrained: Tensor, delta: Tensor) -> Tensor:
    """pretrained + delta * scaling (consumes both)."""
    scaled = ops.mul_scalar(sim, delta)
    sim.drop(delta)
    out = ops.add(sim, pretrained, scaled)
    sim.drop(pretrained, scaled)
    return out


def _index_copy_backward(sim: Sim, node, grad):
    """IndexCopyBackward: the source's gradient is grad.index_select over the adapted columns."""
    source = node.inputs[0]
    return [(source, sim.new(source.elems, grad.dtype, name="index_select"))]


def lora_qkv(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """litgpt/lora.py:381 LoRAQKVLinear.forward: linear(x), after_A = linear(dropout(x), lora_A), after_B = the
    grouped conv1d of after_A's transpose (one conv1d with groups when n_head == n_query_groups, else one per
    chunk, concatenated), zero_pad into the qkv width unless q, k and v are all adapted (new_zeros, index_copy_),
    * scaling, + pretrained."""
    width = d.q_dim + 2 * d.kv_dim
    pretrained = ops.linear(sim, x, p.linears["qkv"], width, d.hidden)
    if "qkv" not in p.lora:
        return pretrained
    lora_a, lora_b = p.lora["qkv"]
    slices = qkv_slices(d, opts)
    rank = opts.lora_rank * len(slices)
    dropped = ops.dropout(sim, x, opts.lora_dropout)
    after_a = ops.linear(sim, dropped, lora_a, rank, d.hidden)
    sim.drop(dropped)
    if d.heads == d.kv_heads:  # F.conv1d(input, weight, groups): saves its input (after_A's view) and weight
        after_b = ops.linear(sim, after_a, lora_b, sum(slices), rank)
    else:  # input.chunk(n) (views), a conv1d per chunk, torch.cat
        parts = ops.chunk(sim, after_a, len(slices))
        outs = [ops.linear(sim, part, lora_b, width_out, opts.lora_rank) for part, width_out in zip(parts, slices)]
        sim.drop(*parts)
        after_b = ops.cat(sim, outs, lf_scale(after_a.elems, sum(slices) / rank))
        sim.drop(*outs)
    sim.drop(after_a)
    if len(slices) < 3:  # zero_pad: result = new_zeros(..., out_features).index_copy_(-1, lora_ind, after_B)
        index = sim.new(const(sum(slices)), "i64", name="lora_ind clone")
        padded = sim.new(lf_scale(after_b.elems, width / sum(slices)), after_b.dtype, name="zero_pad")
        # derivatives.yaml's index_copy source formula, grad.index_select(dim, index).expand_as(source), names
        # the source: autograd saves after_B (the adapters' output) with the index until backward.
        sim.record("index_copy_", padded, [after_b], [index, after_b], _index_copy_backward)
        sim.drop(index, after_b)
        after_b = padded
    return add_scaled(sim, pretrained, after_b)


def apply_rope(sim: Sim, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """litgpt/model.py:1144 apply_rope: cat((-x2, x1)); (x * cos) + (rotated * sin) with fp32 cos and sin (the
    buffers build_rope_cache makes), so the sums are fp32; .to(x.dtype)."""
    first = ops.slice_view(sim, x, 0.5)
    second = ops.slice_view(sim, x, 0.5)
    negated = ops.neg(sim, second)
    rotated = ops.cat(sim, [negated, first], x.elems)
    sim.drop(negated, first, second)
    with_cos = ops.mul(sim, x, cos)
    with_sin = ops.mul(sim, rotated, sin)
    sim.drop(rotated)
    roped = ops.add(sim, with_cos, with_sin)
    sim.drop(with_cos, with_sin)
    out = ops.cast(sim, roped, x.dtype)
    sim.drop(roped)
    return out


def attention(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """litgpt/model.py:430 CausalSelfAttention.forward (no KV cache, no sliding window, SDPA is_causal)."""
    width = d.q_dim + 2 * d.kv_dim
    qkv = lora_qkv(sim, x, p, d, opts)
    # qkv.split(...) then .view(B, T, heads, hs).transpose(1, 2): views of qkv. Backward reshapes each transposed
    # gradient (a copy), and the split's backward concatenates the three into one full-width gradient.
    slices = split(sim, qkv, [width_part / width for width_part in (d.q_dim, d.kv_dim, d.kv_dim)])
    sim.drop(qkv)
    q, k, v = (ops.view_needing_copy_in_backward(sim, part) for part in slices)
    sim.drop(*slices)
    # q[..., :rope_n_elem] is the whole head (rotary_percentage 1); torch.cat with the empty rest copies it.
    rotated = []
    for head in (q, k):
        rotary_part = ops.slice_view(sim, head, 1.0)
        roped = apply_rope(sim, rotary_part, cos, sin)
        passed = ops.slice_view(sim, head, 0.0)
        rotated.append(ops.cat(sim, [roped, passed], head.elems))
        sim.drop(roped, passed, rotary_part)
    sim.drop(q, k)
    q, k = rotated
    if d.heads != d.kv_heads:  # k.repeat_interleave(q_per_kv, dim=1), v alike: copies at the queries' width
        repeated_k = ops.contiguous_copy(sim, k, q.elems)
        repeated_v = ops.contiguous_copy(sim, v, q.elems)
        sim.drop(k, v)
        k, v = repeated_k, repeated_v
    # SDPA's output is laid out like q (head-major after the cat): y.reshape(B, T, C) after the transpose copies it.
    mask = window_masks(sim, q.dtype) if opts.litgpt_window else None  # a local until forward returns
    if mask is not None:
        y = ops.flash_attention(sim, q, k, v, d.heads, d.head_dim, mask)
    else:
        y = attention_core(sim, q, k, v, d, opts)
    copied = ops.contiguous_copy(sim, y)
    sim.drop(y)
    out = lora_linear(sim, copied, p, "o_proj", d.q_dim, d.hidden, opts)
    sim.drop(copied, q, k, v, mask)
    return out


def window_masks(sim: Sim, dtype: str) -> Tensor:
    """litgpt/model.py:552-563, a layer with apply_sliding_window_attention and no KV cache: the causal mask
    (ones(T, T).triu(1), masked_fill_ with -inf through a bool copy), then the window mask torch.full((T, T), -inf)
    zeroed row by row, which replaces it and goes to SDPA (kept for backward by its memory-efficient kernel)."""
    ones = sim.new(per_position_sq(1), dtype, name="ones")
    causal = sim.new(per_position_sq(1), dtype, name="triu")
    sim.drop(ones)
    as_bool = sim.new(per_position_sq(1), "bool", name="mask.bool()")
    sim.drop(as_bool)
    window = sim.new(per_position_sq(1), dtype, name="sliding_window_mask")
    sim.drop(causal)
    return window


def split(sim: Sim, x: Tensor, fractions: list[float]) -> list[Tensor]:
    """x.split(sizes, dim=-1): views; one SplitWithSizesBackward node concatenates the parts' gradients."""
    pseudo = sim.alias(x)
    pseudo.collected = []
    sim.record("split", pseudo, [x], [], ops._split_backward)
    views = []
    for fraction in fractions:
        part = sim.alias(pseudo, lf_scale(x.elems, fraction))
        sim.record("view", part, [pseudo], [], ops._identity_backward)
        views.append(part)
    sim.drop(pseudo)
    return views


def mlp(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options) -> Tensor:
    """litgpt/model.py:827 LLaMAMLP.forward: x_fc_1 = fc_1(x); x_fc_2 = fc_2(x); proj(silu(x_fc_1) * x_fc_2)."""
    fc_1 = lora_linear(sim, x, p, "gate_proj", d.hidden, d.intermediate, opts)
    fc_2 = lora_linear(sim, x, p, "up_proj", d.hidden, d.intermediate, opts)
    act = ops.silu(sim, fc_1)
    product = ops.mul(sim, act, fc_2)
    sim.drop(act)
    out = lora_linear(sim, product, p, "down_proj", d.intermediate, d.hidden, opts)
    sim.drop(product, fc_1, fc_2)
    return out


def layer(sim: Sim, x: Tensor, p: LayerParams, d: Dims, opts: Options, cos: Tensor, sin: Tensor) -> Tensor:
    """litgpt/model.py:345 Block.forward, non-parallel residual: x + attn(norm_1(x)); + mlp(norm_2(x))."""
    normed = rms_norm(sim, x, p.norms[0], d.hidden)
    attn = attention(sim, normed, p, d, opts, cos, sin)
    residual = ops.add(sim, attn, x)
    sim.drop(attn)
    normed_2 = rms_norm(sim, residual, p.norms[1], d.hidden)
    sim.drop(normed)  # x_normed is rebound to norm_2's output
    mlp_out = mlp(sim, normed_2, p, d, opts)
    out = ops.add(sim, mlp_out, residual)
    sim.drop(mlp_out, residual, normed_2)
    return out
