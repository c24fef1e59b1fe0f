"""The ops transformer layers are made of, with PyTorch's allocation behaviour.

For each op: what the forward allocates, what autograd saves (PyTorch saves
one operand of a product only if the other needs a gradient), and what the
backward formula allocates, in order. Sizes are element counts as linear forms
(see core.py); dtypes follow type promotion and autocast's policy.
"""

from __future__ import annotations

from memtui.engine.estimator.sim.core import DTYPE_BYTES, LF, Sim, Tensor, const, lf_scale

_PROMOTION = {"f32": 3, "bf16": 2, "f16": 2, "i64": 1, "i32": 1, "bool": 0, "u8": 0, "i8": 0}


def promote(a: str, b: str) -> str:
    if a == b:
        return a
    if "f32" in (a, b):
        return "f32"
    return a if _PROMOTION[a] >= _PROMOTION[b] else b


def _bigger(a: Tensor, b: Tensor) -> LF:
    """Broadcast result size: the operand with more elements (shapes here broadcast one way)."""
    return a.elems if sum(a.elems[1:]) + a.elems[0] * 1e-9 >= sum(b.elems[1:]) + b.elems[0] * 1e-9 else b.elems


# ---- casts ----------------------------------------------------------------------------------
def _cast_backward(sim: Sim, node, grad):
    return [(node.inputs[0], sim.ref(grad))]  # the engine casts it back to the input's dtype


def cast(sim: Sim, x: Tensor, dtype: str) -> Tensor:
    """x.to(dtype): the same tensor when the dtype already matches."""
    if x.dtype == dtype:
        return sim.ref(x)
    out = sim.new(x.elems, dtype, name="to_copy")
    sim.record("to_copy", out, [x], [], _cast_backward)
    return out


def autocast_operand(sim: Sim, x: Tensor) -> Tensor:
    """Autocast's cast of a matmul operand; leaf weights that need gradients are cached, and so is any fp32 leaf
    that needs them (autocast's cached_cast: a pipeline stage's received input, which OLMo 2's first q/k/v
    projections then share)."""
    dtype = sim.autocast_dtype
    if dtype is None or x.dtype == dtype or x.dtype not in ("f32", "f16", "bf16"):
        return sim.ref(x)
    cacheable = (x.param or (x.leaf and x.dtype == "f32")) and x.requires_grad
    if cacheable and id(x) in sim.autocast_cache:
        return sim.ref(sim.autocast_cache[id(x)])
    out = cast(sim, x, dtype)
    if cacheable:
        sim.autocast_cache[id(x)] = sim.ref(out)
        out.cached = True
    return out


def fp32_policy(sim: Sim, x: Tensor) -> Tensor:
    """CUDA autocast runs some ops (pow, softmax, ...) in fp32: their 16-bit inputs are cast first."""
    if sim.autocast_dtype is not None and x.dtype in ("bf16", "f16"):
        return cast(sim, x, "f32")
    return sim.ref(x)


# ---- matmuls ---------------------------------------------------------------------------------
def _linear_backward(sim: Sim, node, grad):
    x, weight = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    results = []
    grad_weight = grad_input = grad_bias = None
    if weight.requires_grad:
        grad_weight = sim.new(weight.elems, grad.dtype, name="mm grad weight")
    if x.requires_grad:
        grad_input = sim.new(x.elems, grad.dtype, name="mm grad input")
    if bias is not None and bias.requires_grad:
        grad_bias = sim.new(bias.elems, grad.dtype, name="bias grad")
    if grad_input is not None:
        results.append((x, grad_input))
    if grad_weight is not None:
        results.append((weight, grad_weight))
    if grad_bias is not None:
        results.append((bias, grad_bias))
    return results


def linear(sim: Sim, x: Tensor, weight: Tensor, out_features: int, in_features: int, bias: Tensor | None = None,
           *, op: str = "linear") -> Tensor:
    """F.linear / addmm. Autocast casts bias, weight, then input (C++ evaluates arguments right to left).
    `op`: "linear" saves the weight's transpose (a view), "addmm" (GPT-2's Conv1D) the weight itself."""
    bias_c = autocast_operand(sim, bias) if bias is not None else None
    weight_c = autocast_operand(sim, weight)
    x_c = autocast_operand(sim, x)
    return _weight_matmul(sim, x_c, weight_c, bias_c, out_features, in_features, op=op)


def _weight_matmul(sim: Sim, x_c: Tensor, weight_c: Tensor, bias_c: Tensor | None, out_features: int, in_features: int,
                   *, op: str = "linear", backward=_linear_backward) -> Tensor:
    """x @ W (+ b) on operands already cast; consumes their references."""
    elems = lf_scale(x_c.elems, out_features / in_features)
    saved = []
    if weight_c.requires_grad:
        saved.append(x_c)
    if x_c.requires_grad:
        saved.append(weight_c)
    inputs = [x_c, weight_c] + ([bias_c] if bias_c is not None else [])
    if sim.stops_as_inputs_are_saved(inputs):
        out = Tensor(elems=elems, dtype=x_c.dtype, alive=False)  # never allocated: record() ends the recompute
    else:
        out = sim.policy_saved(elems, x_c.dtype, name="linear", op="addmm" if bias_c is not None else "mm")
    sim.record(op, out, inputs, saved, backward)
    sim.drop(bias_c, weight_c, x_c)
    return out


# ---- float8 linears (torchao) -------------------------------------------------------------------
def _float8_cast(sim: Sim, x: Tensor, elems: LF | None = None) -> Tensor:
    """torchao's hp_tensor_to_float8_dynamic, tensorwise (torchao/float8/float8_scaling_utils.py:29): the amax
    reads `torch.abs(x)` (a full-size temporary, float8_utils.py:65), then _ToFloat8ConstrFunc
    (float8_training_tensor.py:153) computes `x.to(float32) * scale` and to_fp8_saturated clamps it into a new
    fp32 tensor and casts that to float8: the scaled tensor is the caller's local, alive until the fp8 copy exists.
    The amax is torchtitan's op-level checkpointing saves `max` (one 512-byte allocator block); the scale and the
    other scalars (freed at once) are left out."""
    elems = elems if elems is not None else x.elems
    absolute = sim.new(elems, x.dtype, name="float8 amax abs")
    amax = sim.policy_saved(const(512 / DTYPE_BYTES[x.dtype]), x.dtype, name="float8 amax", op="max")
    sim.drop(absolute, amax)
    upcast = sim.new(elems, "f32", name="float8 cast fp32") if x.dtype != "f32" else None
    scaled = sim.new(elems, "f32", name="float8 scaled")
    sim.drop(upcast)
    clamped = sim.new(elems, "f32", name="float8 clamped")
    bits = sim.new(elems, "f8", name="float8 bits")
    sim.drop(clamped, scaled)
    return bits


def float8_linear(sim: Sim, x: Tensor, weight: Tensor, out_features: int, in_features: int,
                  bias: Tensor | None = None) -> Tensor:
    """torchao's Float8Linear (torchao/float8/float8_linear.py), recipe tensorwise, weights not all-gathered in
    float8: `matmul_with_hp_or_float8_args` saves the high-precision input and weight (not their float8 casts) and
    casts both again in backward. Forward: autocast's dtype by a plain `.to` (no autocast cache: the weight is
    cast to float8 from its stored dtype), the input's and the weight's float8 casts, torch._scaled_mm into the
    input's dtype (float8_ops.py:29; `weight.t()` cast keeps its column-major strides: no copy). Backward: the
    output gradient cast twice (for grad_input, then for grad_weight), the weight and the input cast again, and
    preprocess_addmm's (float8_ops.py:342) contiguous copies: the transposed weight for grad_input, the transposed
    gradient and the input for grad_weight. The backward's locals live until it returns."""
    x_c = cast(sim, x, sim.autocast_dtype) if sim.autocast_dtype is not None else sim.ref(x)
    elems = lf_scale(x_c.elems, out_features / in_features)
    n = const(out_features * in_features)
    inputs = [x_c, weight]
    if sim.stops_as_inputs_are_saved(inputs):
        out = Tensor(elems=elems, dtype=x_c.dtype, alive=False)  # never allocated: record() ends the recompute
    else:
        bits_in = _float8_cast(sim, x_c)
        bits_weight = _float8_cast(sim, weight, n)
        # torch._scaled_mm: among the partitioner's compute-intensive ops torchtitan's op-level policy saves
        out = sim.policy_saved(elems, x_c.dtype, name="float8 linear", op="scaled_mm")
        sim.drop(bits_weight, bits_in)

    def backward(sim: Sim, node, grad):
        source, weight = node.inputs[0], node.inputs[1]
        grad_bits = _float8_cast(sim, grad)
        weight_bits = _float8_cast(sim, weight, n)
        weight_copy = sim.new(n, "f8", name="float8 weight.t() contiguous")  # b_data.t().contiguous().t()
        grad_input = sim.new(source.elems, grad.dtype, name="float8 mm grad input")
        sim.drop(weight_copy)
        grad_bits_again = _float8_cast(sim, grad)
        input_bits = _float8_cast(sim, source)
        grad_copy = sim.new(grad.elems, "f8", name="float8 grad_output.t() contiguous")  # a_data.contiguous()
        input_copy = sim.new(source.elems, "f8", name="float8 input contiguous (column-major)")
        grad_weight = sim.new(n, grad.dtype, name="float8 mm grad weight")
        sim.drop(input_copy, grad_copy, input_bits, grad_bits_again, weight_bits, grad_bits)
        results = []
        if source.requires_grad:
            results.append((source, grad_input))
        else:
            sim.drop(grad_input)
        if weight.requires_grad:
            if weight.dtype != grad.dtype:  # validate_outputs casts it to weight.t()'s dtype, grad_output alive
                converted = sim.new(n, weight.dtype, name="grad cast")
                sim.drop(grad_weight)
                grad_weight = converted
            results.append((weight, grad_weight))
        else:
            sim.drop(grad_weight)
        return results

    sim.record("float8_linear", out, inputs, [x_c, weight], backward)
    sim.drop(x_c)
    if bias is None:
        return out
    bias_c = cast(sim, bias, out.dtype)  # `output + self.bias.to(output.dtype)`
    biased = add(sim, out, bias_c)
    sim.drop(out, bias_c)
    return biased


def partial_input_linear(sim: Sim, x: Tensor, weight: Tensor, out_features: int, in_features: int,
                         local_in: int) -> Tensor:
    """DTensor's F.linear of a Partial input (RowwiseParallelLora's lora_A output) with a Shard(1) weight (lora_B:
    `local_in` of its `in_features` columns): the input is reduce-scattered onto its columns inside the op (a
    temporary the trace does not see), the output partial. Backward makes the weight's gradient Partial, every
    column of it (what AccumulateGrad keeps), and the input's on the rank's columns."""
    weight_c = autocast_operand(sim, weight)
    x_c = autocast_operand(sim, x)

    def backward(sim: Sim, node, grad):
        source, weight = node.inputs[0], node.inputs[1]
        results = []
        grad_weight = sim.new(const(out_features * in_features), grad.dtype, name="mm grad weight (partial)") \
            if weight.requires_grad else None
        if source.requires_grad:
            results.append((source, sim.new(lf_scale(source.elems, local_in / in_features), grad.dtype,
                                            name="mm grad input (rank's columns)")))
        if grad_weight is not None:
            results.append((weight, grad_weight))
        return results

    return _weight_matmul(sim, x_c, weight_c, None, out_features, in_features, backward=backward)


def matmul(sim: Sim, a: Tensor, b: Tensor, out_elems: LF) -> Tensor:
    """bmm of two activations already cast and laid out for it; each saved if the other needs a grad."""
    out = sim.policy_saved(out_elems, a.dtype, name="bmm", op="bmm")
    saved = []
    if b.requires_grad:
        saved.append(a)
    if a.requires_grad:
        saved.append(b)
    sim.record("bmm", out, [a, b], saved, _bmm_backward)
    return out


def _bmm_backward(sim: Sim, node, grad):
    a, b = node.inputs
    results = []
    grad_b = sim.new(b.elems, grad.dtype, name="bmm grad b") if b.requires_grad else None
    grad_a = sim.new(a.elems, grad.dtype, name="bmm grad a") if a.requires_grad else None
    if grad_a is not None:
        results.append((a, grad_a))
    if grad_b is not None:
        results.append((b, grad_b))
    return results


# ---- elementwise -------------------------------------------------------------------------------
def _mul_backward(sim: Sim, node, grad):
    a, b = node.inputs
    # The generated MulBackward0 computes the second operand's gradient first.
    grad_b = sim.new(_bigger(a, b), promote(grad.dtype, a.dtype), name="mul grad other") if b.requires_grad else None
    grad_a = sim.new(_bigger(a, b), promote(grad.dtype, b.dtype), name="mul grad self") if a.requires_grad else None
    results = []
    if grad_a is not None:
        results.append((a, grad_a))
    if grad_b is not None:
        results.append((b, grad_b))
    return results


def mul(sim: Sim, a: Tensor, b: Tensor) -> Tensor:
    out = sim.new(_bigger(a, b), promote(a.dtype, b.dtype), name="mul")
    saved = []
    if a.requires_grad:
        saved.append(b)
    if b.requires_grad:
        saved.append(a)
    sim.record("mul", out, [a, b], saved, _mul_backward)
    return out


def _scale_backward(sim: Sim, node, grad):
    return [(node.inputs[0], sim.new(grad.elems, grad.dtype, name="mul scalar grad"))]


def mul_scalar(sim: Sim, x: Tensor) -> Tensor:
    out = sim.new(x.elems, x.dtype, name="mul scalar")
    sim.record("mul_scalar", out, [x], [], _scale_backward)
    return out


def _add_backward(sim: Sim, node, grad):
    return [(tensor, sim.ref(grad)) for tensor in node.inputs if tensor.requires_grad]


def add(sim: Sim, a: Tensor, b: Tensor) -> Tensor:
    out = sim.new(_bigger(a, b), promote(a.dtype, b.dtype), name="add")
    sim.record("add", out, [a, b], [], _add_backward)
    return out


def add_scalar(sim: Sim, x: Tensor) -> Tensor:
    out = sim.new(x.elems, x.dtype, name="add scalar")
    sim.record("add_scalar", out, [x], [], _add_backward)
    return out


def _pow_backward(sim: Sim, node, grad):
    x = node.inputs[0]
    base = sim.new(x.elems, x.dtype, name="pow backward pow")
    scaled = sim.new(x.elems, x.dtype, name="pow backward mul")
    result = sim.new(x.elems, promote(grad.dtype, x.dtype), name="pow backward grad")
    sim.drop(scaled, base)
    return [(x, result)]


def pow_(sim: Sim, x: Tensor) -> Tensor:
    """x.pow(n) (CUDA autocast: in fp32)."""
    x_c = fp32_policy(sim, x)
    out = sim.new(x_c.elems, x_c.dtype, name="pow")
    sim.record("pow", out, [x_c], [x_c], _pow_backward)
    sim.drop(x_c)
    return out


def _mean_backward(sim: Sim, node, grad):
    return [(node.inputs[0], sim.new(node.inputs[0].elems, grad.dtype, name="mean backward"))]


def mean_last(sim: Sim, x: Tensor, width: int) -> Tensor:
    out = sim.new(lf_scale(x.elems, 1 / width), x.dtype, name="mean")
    sim.record("mean", out, [x], [], _mean_backward)
    return out


def _rsqrt_backward(sim: Sim, node, grad):
    result = node.saved[0] if node.saved else node.output
    cube = sim.new(result.elems, result.dtype, name="rsqrt backward pow")
    scaled = sim.new(result.elems, result.dtype, name="rsqrt backward mul")
    out = sim.new(result.elems, result.dtype, name="rsqrt backward grad")
    sim.drop(scaled, cube)
    return [(node.inputs[0], out)]


def rsqrt(sim: Sim, x: Tensor) -> Tensor:
    x_c = fp32_policy(sim, x)
    out = sim.new(x_c.elems, x_c.dtype, name="rsqrt")
    sim.record("rsqrt", out, [x_c], [out], _rsqrt_backward)
    sim.drop(x_c)
    return out


def _unary_saved_input_backward(name: str):
    def backward(sim: Sim, node, grad):
        x = node.inputs[0]
        return [(x, sim.new(x.elems, grad.dtype, name=name))]

    return backward


def silu(sim: Sim, x: Tensor) -> Tensor:
    out = sim.new(x.elems, x.dtype, name="silu")
    sim.record("silu", out, [x], [x], _unary_saved_input_backward("silu_backward"))
    return out


def gelu_tanh(sim: Sim, x: Tensor) -> Tensor:
    """F.gelu(approximate='tanh'), Gemma's activation."""
    out = sim.new(x.elems, x.dtype, name="gelu")
    sim.record("gelu", out, [x], [x], _unary_saved_input_backward("gelu_backward"))
    return out


def sigmoid(sim: Sim, x: Tensor) -> Tensor:
    """x.sigmoid() (gpt-oss's clamped SwiGLU, DeepSeek-V3's router): saves its output; the backward makes one
    gradient of the input's size."""
    out = sim.new(x.elems, x.dtype, name="sigmoid")
    sim.record("sigmoid", out, [x], [out], _unary_saved_input_backward("sigmoid_backward"))
    return out


def _clamp_backward(sim: Sim, node, grad):
    """clamp_backward: where(in range, grad, 0), the range a boolean mask of the input."""
    x = node.inputs[0]
    in_range = sim.new(x.elems, "bool", name="clamp mask")
    out = sim.new(x.elems, grad.dtype, name="clamp_backward")
    sim.drop(in_range)
    return [(x, out)]


def clamp(sim: Sim, x: Tensor) -> Tensor:
    """x.clamp(...): a new (contiguous) tensor; autograd saves the input."""
    out = sim.new(x.elems, x.dtype, name="clamp")
    sim.record("clamp", out, [x], [x], _clamp_backward)
    return out


def add_(sim: Sim, x: Tensor, other: Tensor) -> Tensor:
    """x.add_(other): in place (no allocation, nothing saved); the gradient goes to both unchanged."""
    result = sim.alias(x)
    sim.record("add_", result, [x, other], [], _add_backward)
    return result


def _sub_backward(sim: Sim, node, grad):
    """SubBackward0: the subtrahend's gradient is -grad at full size (then summed to its shape)."""
    x, other = node.inputs
    results = []
    if other.requires_grad:
        results.append((other, sim.new(grad.elems, grad.dtype, name="sub grad other")))
    if x.requires_grad:
        results.append((x, sim.ref(grad)))
    return results


def sub(sim: Sim, x: Tensor, other: Tensor) -> Tensor:
    out = sim.new(_bigger(x, other), promote(x.dtype, other.dtype), name="sub")
    sim.record("sub", out, [x, other], [], _sub_backward)
    return out


def tanh(sim: Sim, x: Tensor) -> Tensor:
    out = sim.new(x.elems, x.dtype, name="tanh")
    sim.record("tanh", out, [x], [out], _unary_saved_input_backward("tanh_backward"))
    return out


def neg(sim: Sim, x: Tensor) -> Tensor:
    out = sim.new(x.elems, x.dtype, name="neg")
    sim.record("neg", out, [x], [], _scale_backward)
    return out


def _slice_backward(full: LF):
    def backward(sim: Sim, node, grad):
        return [(node.inputs[0], sim.new(full, grad.dtype, name="slice_backward"))]

    return backward


def slice_view(sim: Sim, x: Tensor, fraction: float, elems: LF | None = None) -> Tensor:
    """x[..., a:b]: a view (no allocation); its gradient is a zero-filled full-size tensor. `elems`: the view's
    size where it is no fixed fraction (gpt-oss drops the sink column: s of s + 1)."""
    view = sim.alias(x, elems if elems is not None else lf_scale(x.elems, fraction))
    sim.record("slice", view, [x], [], _slice_backward(x.elems))
    return view


def _split_backward(sim: Sim, node, grad):
    """SplitBackward: the parts' gradients are concatenated into one full-size tensor."""
    source = node.inputs[0]
    pseudo = node.output
    full = sim.new(source.elems, grad.dtype, name="split_backward")
    for part_grad in pseudo.collected:
        if part_grad is not grad:
            sim.drop(part_grad)
    pseudo.collected = []
    return [(source, full)]


def chunk(sim: Sim, x: Tensor, parts: int) -> list[Tensor]:
    """x.chunk(parts, dim=-1): views; one SplitBackward node gathers every part's gradient."""
    pseudo = sim.alias(x)
    pseudo.collected = []
    sim.record("split", pseudo, [x], [], _split_backward)
    views = []
    for _ in range(parts):
        part = sim.alias(pseudo, lf_scale(x.elems, 1 / parts))
        sim.record("view", part, [pseudo], [], _identity_backward)
        views.append(part)
    sim.drop(pseudo)
    return views


def _gather_backward(sim: Sim, node, grad):
    """IndexBackward: the gradient is scattered into a zero-filled tensor of the source's size."""
    return [(node.inputs[0], sim.new(node.inputs[0].elems, grad.dtype, name="index_backward"))]


def gather_rows(sim: Sim, x: Tensor, elems: LF, rows: LF, indices: Tensor | None = None) -> Tensor:
    """x[indices] along the first dimension: a new tensor; the int64 indices (made here, or `indices` the caller
    holds) are saved for backward, which scatters into zeros. (Saving them also keeps a checkpoint's recompute
    going this far.)"""
    indices = sim.ref(indices) if indices is not None else sim.new(rows, "i64", name="indices")
    if sim.stops_as_inputs_are_saved([x]):  # a recompute ending at the saved indices never makes the output
        out = Tensor(elems=elems, dtype=x.dtype, alive=False)
    else:
        out = sim.new(elems, x.dtype, name="index")
    sim.record("index", out, [x], [indices], _gather_backward)
    sim.drop(indices)
    return out


def topk(sim: Sim, x: Tensor, elems: LF) -> Tensor:
    """torch.topk(x, k): the values (a new tensor) and int64 indices, saved for backward, which scatters the
    gradient into zeros of the input's size. x.max(dim, keepdim=True).values allocates and saves the same."""
    indices = sim.new(elems, "i64", name="topk indices")
    out = sim.new(elems, x.dtype, name="topk values")
    sim.record("topk", out, [x], [indices], _gather_backward)
    sim.drop(indices)
    return out


def _div_backward(sim: Sim, node, grad):
    """DivBackward0 of x / y with y broadcast: grad / y for x, and the reduced -grad * x / y^2 for y."""
    x, y = node.inputs
    grad_y = sim.new(x.elems, grad.dtype, name="div grad other")
    grad_x = sim.new(x.elems, grad.dtype, name="div grad self")
    return [(x, grad_x), (y, grad_y)]


def div_(sim: Sim, x: Tensor, y: Tensor) -> Tensor:
    """x /= y (y broadcast): in place; autograd keeps the original x (a clone) and y for backward."""
    original = sim.new(x.elems, x.dtype, name="div_ saved self")
    result = sim.alias(x)
    sim.record("div_", result, [original, y], [original, y], _div_backward)
    sim.drop(original)
    return result


def grouped_mm(sim: Sim, x: Tensor, weight: Tensor, out_features: int, in_features: int) -> Tensor:
    """torch._grouped_mm over experts' stacked weights: no autocast cast (it is not on autocast's lists)."""
    return _weight_matmul(sim, sim.ref(x), sim.ref(weight), None, out_features, in_features)


def _sum_backward(sim: Sim, node, grad):
    """SumBackward expands the gradient; the view back to the input's shape copies it."""
    return [(node.inputs[0], sim.new(node.inputs[0].elems, grad.dtype, name="sum backward"))]


def sum_groups(sim: Sim, x: Tensor, groups: int) -> Tensor:
    """x.view(n, groups, d).sum(dim=1)."""
    out = sim.new(lf_scale(x.elems, 1 / groups), x.dtype, name="sum")
    sim.record("sum", out, [x], [], _sum_backward)
    return out


def cat_backward(sim: Sim, node, grad):
    """CatBackward: each part's gradient is a narrow view of the output's (no allocation)."""
    return [(part, sim.alias(grad, part.elems)) for part in node.inputs if part.requires_grad]


def cat(sim: Sim, parts: list[Tensor], elems: LF) -> Tensor:
    """torch.cat; its dtype follows type promotion over the parts."""
    dtype = parts[0].dtype
    for part in parts[1:]:
        dtype = promote(dtype, part.dtype)
    out = sim.new(elems, dtype, name="cat")
    sim.record("cat", out, parts, [], cat_backward)
    return out


def _reshape_copy_backward(sim: Sim, node, grad):
    """View backward on a non-contiguous gradient: reshape copies it."""
    return [(node.inputs[0], sim.new(grad.elems, grad.dtype, name="reshape copy"))]


def view_needing_copy_in_backward(sim: Sim, x: Tensor) -> Tensor:
    """`linear(x).view(...).transpose(1, 2)`: free in forward; backward reshapes a transposed gradient."""
    view = sim.alias(x)
    sim.record("view", view, [x], [], _reshape_copy_backward)
    return view


def _identity_backward(sim: Sim, node, grad):
    return [(node.inputs[0], sim.ref(grad))]


def _expand_backward(sim: Sim, node, grad):
    """Gradient of an expand: summed back to the source's size."""
    source = node.inputs[0]
    if grad.elems == source.elems:
        return [(source, sim.ref(grad))]
    return [(source, sim.new(source.elems, grad.dtype, name="expand sum"))]


def view(sim: Sim, x: Tensor) -> Tensor:
    """A view whose backward is free (the gradient is reshaped without a copy)."""
    alias = sim.alias(x)
    sim.record("view", alias, [x], [], _identity_backward)
    return alias


def expand_view(sim: Sim, x: Tensor, elems: LF) -> Tensor:
    """x.expand(...) (or a reshape of it that stays a view): no allocation; its gradient is summed back."""
    alias = sim.alias(x, elems)
    sim.record("expand", alias, [x], [], _expand_backward)
    return alias


def contiguous_copy(sim: Sim, x: Tensor, elems: LF | None = None) -> Tensor:
    """.contiguous() / .clone() that allocates (repeat_kv's expand + reshape: `elems` larger than x)."""
    out = sim.new(elems if elems is not None else x.elems, x.dtype, name="clone")
    sim.record("clone", out, [x], [], _expand_backward)
    return out


# ---- attention ----------------------------------------------------------------------------------
def _flash_backward(sim: Sim, node, grad):
    q, k, v = node.inputs
    grads = [sim.new(t.elems, t.dtype, name="flash grad") for t in (q, k, v)]
    return [(t, g) for t, g in zip((q, k, v), grads) if t.requires_grad] + [
        (t, g) for t, g in zip((q, k, v), grads) if not t.requires_grad
    ]


def flash_attention(sim: Sim, q: Tensor, k: Tensor, v: Tensor, heads: int, head_dim: int, mask: Tensor | None = None) -> Tensor:
    """SDPA's fused kernel (FlashAttention / memory-efficient): saves q, k, v, out, a logsumexp (and a mask)."""
    q_c, k_c, v_c = (autocast_operand(sim, t) for t in (q, k, v))
    # The output has the values' width (DeepSeek-V3's are narrower than its queries and keys).
    out_elems = q_c.elems if v_c.elems == k_c.elems else lf_scale(q_c.elems, sum(v_c.elems) / sum(k_c.elems))
    out = sim.policy_saved(out_elems, q_c.dtype, name="sdpa out", op="sdpa")
    logsumexp = sim.policy_saved(lf_scale(q_c.elems, 1 / head_dim), "f32", name="sdpa logsumexp", op="sdpa")
    saved = [q_c, k_c, v_c, out, logsumexp] + ([mask] if mask is not None else [])
    sim.record("flash", out, [q_c, k_c, v_c], saved, _flash_backward)
    sim.drop(q_c, k_c, v_c, logsumexp)
    return out


def _softmax_backward(sim: Sim, node, grad):
    x = node.inputs[0]
    return [(x, sim.new(x.elems, grad.dtype, name="softmax backward"))]


def _half_to_float_backward(sim: Sim, node, grad):
    """_softmax_backward_data of a half_to_float softmax writes the Half gradient itself."""
    x = node.inputs[0]
    return [(x, sim.new(x.elems, x.dtype, name="softmax backward"))]


def softmax(sim: Sim, x: Tensor, dtype: str | None, rows: LF) -> Tensor:
    """softmax(x, dtype=...) as CUDA runs it (aten/src/ATen/native/SoftMax.cpp); it saves its output. CUDA
    autocast asks for fp32 when no dtype is given (fp32_set_opt_dtype). An fp16 input asked for fp32 runs
    _softmax(half_to_float=True): the fp32 output alone, and a Half gradient in backward. Any other change of
    dtype (bf16 to fp32) casts the input first: a full-size copy, alive while the kernel runs."""
    if dtype is None and sim.autocast_dtype is not None and x.dtype in ("bf16", "f16"):
        dtype = "f32"
    out_dtype = dtype or x.dtype
    if x.dtype == "f16" and out_dtype == "f32":
        out = sim.new(x.elems, out_dtype, name="softmax")
        sim.reduces_rows(out, rows)
        sim.record("softmax", out, [x], [out], _half_to_float_backward)
        return out
    converted = cast(sim, x, out_dtype)
    out = sim.new(x.elems, out_dtype, name="softmax")
    sim.reduces_rows(out, rows)
    sim.record("softmax", out, [converted], [out], _softmax_backward)
    sim.drop(converted)
    return out


def _dropout_backward(sim: Sim, node, grad):
    x = node.inputs[0]
    return [(x, sim.new(x.elems, grad.dtype, name="dropout backward"))]


def dropout(sim: Sim, x: Tensor, p: float) -> Tensor:
    """nn.Dropout in training: output plus a bool mask saved for backward (identity when p == 0)."""
    if p == 0:
        return sim.ref(x)
    out = sim.new(x.elems, x.dtype, name="dropout")
    mask = sim.new(x.elems, "bool", name="dropout mask")
    sim.record("dropout", out, [x], [mask], _dropout_backward)
    sim.drop(mask)
    return out


# ---- embeddings and losses ------------------------------------------------------------------------
def _embedding_backward(sim: Sim, node, grad):
    weight = node.inputs[0]
    return [(weight, sim.new(weight.elems, grad.dtype, name="embedding_dense_backward"))]


def embedding(sim: Sim, weight: Tensor, ids: Tensor, width: int) -> Tensor:
    out = sim.new(lf_scale(ids.elems, width), weight.dtype, name="embedding")
    sim.record("embedding", out, [weight], [ids], _embedding_backward)
    return out


def _log_softmax_backward(sim: Sim, node, grad):
    x = node.inputs[0]
    return [(x, sim.new(x.elems, grad.dtype, name="log_softmax backward"))]


def _passed_through(sim: Sim, node, grad):
    return [(node.inputs[0], sim.ref(grad))]


def log_softmax(sim: Sim, x: Tensor, *, loss_parallel: bool = False) -> Tensor:
    """`loss_parallel`: DTensor's loss-parallel handlers, whose nll_loss backward makes the whole gradient of the
    logits (vocabulary-sharded); log_softmax's backward then hands it on without a tensor of its own."""
    x_c = fp32_policy(sim, x)
    out = sim.new(x_c.elems, x_c.dtype, name="log_softmax")
    sim.record("log_softmax", out, [x_c], [out], _passed_through if loss_parallel else _log_softmax_backward)
    sim.drop(x_c)
    return out


def _nll_backward(sim: Sim, node, grad):
    logprobs = node.inputs[0]
    return [(logprobs, sim.new(logprobs.elems, logprobs.dtype, name="nll_loss_backward"))]


def nll_loss(sim: Sim, logprobs: Tensor, target: Tensor, *, elems: LF = (1.0, 0.0, 0.0, 0.0, 0.0)) -> Tensor:
    """`elems`: the output's size, one loss per row with reduction="none"."""
    out = sim.new(elems, logprobs.dtype, name="nll_loss")
    total_weight = sim.new((1.0, 0.0, 0.0, 0.0, 0.0), logprobs.dtype, name="nll total weight")
    sim.record("nll_loss", out, [logprobs], [target, total_weight], _nll_backward)
    sim.drop(total_weight)
    return out


def layer_norm(sim: Sim, x: Tensor, weight: Tensor, bias: Tensor, width: int) -> Tensor:
    """nn.LayerNorm: output plus per-row mean and rstd (fp32), all saved with the input."""
    x_c = fp32_policy(sim, x)
    out = sim.new(x_c.elems, x_c.dtype, name="layer_norm")
    rows = lf_scale(x_c.elems, 1 / width)
    mean = sim.new(rows, "f32", name="layer_norm mean")
    rstd = sim.new(rows, "f32", name="layer_norm rstd")
    sim.record("layer_norm", out, [x_c, weight, bias], [x_c, weight, bias, mean, rstd], _layer_norm_backward)
    sim.drop(mean, rstd, x_c)
    return out


def _layer_norm_backward(sim: Sim, node, grad):
    x, weight, bias = node.inputs
    results = []
    grad_x = sim.new(x.elems, x.dtype, name="layer_norm grad input") if x.requires_grad else None
    grad_w = sim.new(weight.elems, weight.dtype, name="layer_norm grad weight") if weight.requires_grad else None
    grad_b = sim.new(bias.elems, bias.dtype, name="layer_norm grad bias") if bias.requires_grad else None
    for target, value in ((x, grad_x), (weight, grad_w), (bias, grad_b)):
        if value is not None:
            results.append((target, value))
    return results


# ---- sequence parallelism (DTensor, torchtitan's plan) --------------------------------------------------
def _gather_tokens_backward(sim: Sim, node, grad):
    """The gradient of an all-gathered input is reduce-scattered back onto the sequence: funcol's
    reduce_scatter_tensor on dimension 1 first copies the chunks into a dimension-0 layout (cat)."""
    source = node.inputs[0]
    arranged = sim.new(grad.elems, grad.dtype, name="reduce-scatter input (cat)")
    scattered = sim.new(source.elems, grad.dtype, name="reduce-scatter")
    sim.drop(arranged)
    return [(source, scattered)]


def all_gather_columns(sim: Sim, x: Tensor, ranks: int, whole: float) -> Tensor:
    """ColwiseParallelLora's hook on lora_A: its output, this rank's columns, all-gathered to `whole` times its
    size: funcol gathers every rank's shard into one buffer (dimension 0) and cat() lays the columns out; the
    gradient is reduce-scattered back (a cat of the chunks, then the rank's shard)."""
    buffer = sim.new(lf_scale(x.elems, ranks), x.dtype, name="all-gather buffer")
    out = sim.new(lf_scale(x.elems, whole), x.dtype, name="all-gather (cat)")
    sim.drop(buffer)
    sim.record("all_gather", out, [x], [], _gather_tokens_backward)
    return out


def all_gather_tokens(sim: Sim, x: Tensor, ranks: int) -> Tensor:
    """DTensor Shard(1) -> Replicate: the sequence all-gathered from `ranks` ranks (one new tensor)."""
    out = sim.new(lf_scale(x.elems, ranks), x.dtype, name="all-gather")
    sim.record("all_gather", out, [x], [], _gather_tokens_backward)
    return out


def _scatter_tokens_backward_for(ranks: int):
    def backward(sim: Sim, node, grad):
        source = node.inputs[0]
        return [(source, sim.new(lf_scale(grad.elems, ranks), grad.dtype, name="all-gather (backward)"))]

    return backward


def reduce_scatter_tokens(sim: Sim, x: Tensor, ranks: int) -> Tensor:
    """DTensor Partial -> Shard(1) (RowwiseParallel's output): a dimension-0 copy of the chunks (cat), then the
    reduce-scatter's 1/ranks output; its backward all-gathers the gradient."""
    arranged = sim.new(x.elems, x.dtype, name="reduce-scatter input (cat)")
    out = sim.new(lf_scale(x.elems, 1 / ranks), x.dtype, name="reduce-scatter")
    sim.drop(arranged)
    sim.record("reduce_scatter", out, [x], [], _scatter_tokens_backward_for(ranks))
    return out


def split_tokens(sim: Sim, x: Tensor, ranks: int) -> Tensor:
    """DTensor Replicate -> Shard(1): this rank's chunk of the sequence cloned out (`_replicate_to_shard`); its
    backward all-gathers the gradient."""
    out = sim.new(lf_scale(x.elems, 1 / ranks), x.dtype, name="sequence chunk")
    sim.record("split", out, [x], [], _scatter_tokens_backward_for(ranks))
    return out


def _all_reduce_backward(sim: Sim, node, grad):
    return [(node.inputs[0], sim.ref(grad))]


def all_reduce(sim: Sim, x: Tensor) -> Tensor:
    """DTensor Partial -> Replicate: funcol's all_reduce into a new tensor; its gradient passes through."""
    out = sim.new(x.elems, x.dtype, name="all-reduce")
    sim.record("all_reduce", out, [x], [], _all_reduce_backward)
    return out


def _all_to_all_backward(sim: Sim, node, grad):
    source = node.inputs[0]
    return [(source, sim.new(grad.elems, grad.dtype, name="all-to-all (backward)"))]


def all_to_all(sim: Sim, x: Tensor) -> Tensor:
    """DTensor between two sharded dimensions (`_dtensor.shard_dim_alltoall`): a new tensor of the same size, the
    other dimension sharded; its backward is the all-to-all of the gradient back."""
    out = sim.new(x.elems, x.dtype, name="all-to-all")
    sim.record("all_to_all", out, [x], [], _all_to_all_backward)
    return out


# ---- DeepSeek-V3's router (its sigmoid is the one above) ------------------------------------------------
def _gather_columns_backward(sim: Sim, node, grad):
    """GatherBackward: new_zeros of the source's size, scatter_add into a second one."""
    source = node.inputs[0]
    zeros = sim.new(source.elems, grad.dtype, name="gather backward zeros")
    out = sim.new(source.elems, grad.dtype, name="gather backward scatter_add")
    sim.drop(zeros)
    return [(source, out)]


def gather_columns(sim: Sim, x: Tensor, index: Tensor, elems: LF) -> Tensor:
    """x.gather(1, index): a new tensor of the index's size; the int64 index is saved for backward."""
    out = sim.new(elems, x.dtype, name="gather")
    sim.record("gather", out, [x], [index], _gather_columns_backward)
    return out
