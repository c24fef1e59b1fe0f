"""torchao's float8 training linears (Float8Linear, recipe tensorwise), as torchtitan's float8 converter applies them.

torchao is not a dependency: this is a stand-in whose tensor operations, and so its allocations, follow torchao's
own (pytorch/ao at 36027d8, BSD-3-Clause, Copyright (c) Meta Platforms, Inc. and affiliates):

- torchao/float8/float8_linear.py: Float8Linear.forward (autocast's dtype by `input.to`, the weight passed as
  `self.weight.t()`, the bias added after) and matmul_with_hp_or_float8_args, which saves the high-precision input
  and weight and casts them to float8 in forward and again in backward (the output gradient twice);
- torchao/float8/float8_utils.py tensor_to_amax / amax_to_scale / to_fp8_saturated and
  float8_training_tensor.py _ToFloat8ConstrFunc: the dynamic tensorwise cast;
- torchao/float8/float8_ops.py preprocess_addmm and addmm_float8_unwrapped: the operands made row-major (a) and
  column-major (b), then torch._scaled_mm into the first operand's original dtype.

The float8 data and its scale travel as plain (bits, scale, dtype) tuples instead of Float8TrainingTensor: the
subclass's views (reshape, t) allocate nothing, and autocast's cast of it (float8_ops.py autocast_to_copy) only
relabels its dtype. torch._scaled_mm has meta kernels, so fake tensors run it.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn  # Float8LinearConfig's default for input and weight
E5M2 = torch.float8_e5m2  # and for grad_output
EPS = 1e-12  # torchao/float8/float8_utils.py EPS


@torch.no_grad()
def _to_float8(hp: torch.Tensor, float8_dtype: torch.dtype):
    """hp_tensor_to_float8_dynamic, tensorwise: (bits, scale, original dtype)."""
    amax = torch.max(torch.abs(hp))  # tensor_to_amax
    scale = (torch.finfo(float8_dtype).max / torch.clamp(amax.to(torch.float64), min=EPS)).to(torch.float32)
    scaled = hp.to(torch.float32) * scale  # _ToFloat8ConstrFunc.forward: `tensor_scaled` lives until it returns
    clamped = scaled.clamp(min=-torch.finfo(float8_dtype).max, max=torch.finfo(float8_dtype).max)
    bits = clamped.to(float8_dtype)  # to_fp8_saturated
    del clamped, scaled
    return bits, scale, hp.dtype


def _is_row_major(stride) -> bool:
    return stride[0] > stride[1] and stride[1] == 1  # torchao/float8/float8_utils.py is_row_major


def _mm(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """float8_mm -> preprocess_addmm -> addmm_float8_unwrapped (tensorwise): the output in a's original dtype."""
    a_data, a_scale, _ = a
    b_data, b_scale, _ = b
    if not _is_row_major(a_data.stride()):
        a_data = a_data.contiguous()
    if _is_row_major(b_data.stride()):
        b_data = b_data.t().contiguous().t()
    return torch._scaled_mm(a_data, b_data, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(),
                            out_dtype=out_dtype)


def _t(x):
    return x[0].t(), x[1], x[2]


class _Float8Matmul(torch.autograd.Function):
    """matmul_with_hp_or_float8_args with every cast config dynamic and tensorwise (torchtitan's default recipe)."""

    @staticmethod
    def forward(ctx, input_hp: torch.Tensor, weight_hp_t: torch.Tensor):
        ctx.save_for_backward(input_hp, weight_hp_t)
        input_fp8 = _to_float8(input_hp, E4M3)
        weight_fp8_t = _to_float8(weight_hp_t, E4M3)
        shape = input_hp.shape
        reshaped = (input_fp8[0].reshape(-1, shape[-1]), input_fp8[1], input_fp8[2])
        result = _mm(reshaped, weight_fp8_t, input_fp8[2])
        return result.reshape(*shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        input_hp, weight_hp_t = ctx.saved_tensors
        grad_shape = grad_output.shape
        grad_reshaped = grad_output.reshape(-1, grad_shape[-1])
        grad_fp8_dim0 = _to_float8(grad_reshaped, E5M2)
        weight_t_fp8_dim0 = _to_float8(weight_hp_t, E4M3)
        grad_input = _mm(grad_fp8_dim0, _t(weight_t_fp8_dim0), grad_fp8_dim0[2])
        grad_input = grad_input.reshape(*grad_shape[:-1], grad_input.shape[-1])
        input_reshaped = input_hp.reshape(-1, input_hp.shape[-1])
        grad_fp8_dim1 = _to_float8(grad_reshaped, E5M2)
        input_fp8_dim1 = _to_float8(input_reshaped, E4M3)
        grad_weight = _mm(_t(grad_fp8_dim1), input_fp8_dim1, grad_fp8_dim1[2])
        return grad_input, grad_weight.t()


class Float8Linear(torch.nn.Linear):
    """torchao's Float8Linear.forward; the module keeps the nn.Linear's parameters (from_float reuses them)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled():
            input = input.to(torch.get_autocast_gpu_dtype())
        output = _Float8Matmul.apply(input, self.weight.t())
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output


def converts(linear: torch.nn.Linear) -> bool:
    """memtui's filter (estimator: sim/families.py float8_converts): torch._scaled_mm needs both dimensions
    divisible by 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_to_float8(model) -> int:
    """torchao's convert_to_float8_training over the decoder layers: every nn.Linear but the output head (torchtitan's
    module_filter_fn `fqn != "output"`). Returns how many were swapped."""
    swapped = 0
    for module in model.model.layers.modules():
        if type(module) is torch.nn.Linear and converts(module):
            module.__class__ = Float8Linear
            swapped += 1
    return swapped
