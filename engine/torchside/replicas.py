"""Allocation-exact stand-ins for bitsandbytes, for places its CUDA kernels cannot run.

A fake-tensor trace on a CPU cannot run bitsandbytes' CUDA kernels, so the
tracer swaps in these replicas. They store exactly what bitsandbytes stores
(packed 4-bit weights, double-quantized absmax, fp32 second-level absmax, the
NF4 code, the offset; int8 weights with a per-row scale; 8-bit optimizer
states with block-wise absmax) and allocate what its training path allocates:

- NF4 (bitsandbytes 0.50, MatMul4Bit): training-sized matmuls (more than 1536
  tokens) take the dequantize + F.linear path: the nested absmax is
  dequantized to fp32, the offset added, the weight dequantized to the compute
  dtype, multiplied, and freed. Backward dequantizes again for grad_input.
  Only the quantized weight is saved. Before 0.43.2 (--bnb-version legacy) MatMul4Bit also kept its input
  (`ctx.tensors = (A, B)` whenever an input needs a gradient: bitsandbytes 0.42.0,
  bitsandbytes/autograd/_functions.py; dropped by PR #1270, commit 9e75374, released in 0.43.2): a ctx
  attribute, which no saved-tensor hook sees and backward never releases, alive until the graph is freed.
- LLM.int8 (MatMul8bitLt): the input is cast to fp16 and quantized row-wise
  (int8 + fp32 row scales), multiplied into an int32 product, dequantized to
  fp16; backward dequantizes the weight to the input dtype.
On CUDA with bitsandbytes installed, the real modules are used instead.
The numbers the replicas compute are not meaningful; they exist to be traced.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memtui.engine.model.architectures import ModelSpec

NF4_BLOCK = 64
NESTED_BLOCK = 256


class _Nf4MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        if module.keeps_input and ctx.needs_input_grad[0]:
            ctx.tensors = (x, module.weight)  # bitsandbytes before 0.43.2 (the weight is the module's own)
        return module.dequantized_linear(x)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.module.dequantize(grad_output.dtype)
        return grad_output @ weight, None


class Nf4LinearReplica(nn.Linear):
    """bitsandbytes Linear4bit (nf4, double quantization), allocation for allocation.

    An nn.Linear subclass (as bitsandbytes' is) so peft wraps it; see lora_wrappers().
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device=None,
                 keeps_input: bool = False):
        nn.Module.__init__(self)
        n = in_features * out_features
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.keeps_input = keeps_input  # bitsandbytes before 0.43.2: MatMul4Bit keeps its input (see _Nf4MatMul)
        self.weight = nn.Parameter(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device), requires_grad=False)
        blocks = math.ceil(n / NF4_BLOCK)
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax2", torch.empty(math.ceil(blocks / NESTED_BLOCK), dtype=torch.float32, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False) if bias else None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        absmax = torch.empty(self.absmax.shape, dtype=torch.float32, device=self.absmax.device)  # dequantize_blockwise
        absmax = absmax + self.offset
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)

    def dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        absmax_dq = torch.empty(self.absmax.shape, dtype=torch.float32, device=self.absmax.device)
        absmax = absmax_dq + self.offset  # noqa: F841 - held like bitsandbytes' local until the matmul returns
        weight = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
        return nn.functional.linear(x, weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _Nf4MatMul.apply(x, self)
        if bias is not None:
            out = out + bias
        return out.to(input_dtype)


class _Int8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        ctx.input_dtype = x.dtype
        a16 = x.to(torch.float16)
        quantized = torch.empty(a16.shape, dtype=torch.int8, device=x.device)
        row_scale = torch.empty(a16.shape[:-1], dtype=torch.float32, device=x.device)
        product = torch.empty(*a16.shape[:-1], module.out_features, dtype=torch.int32, device=x.device)
        del a16, quantized
        out = torch.empty(*x.shape[:-1], module.out_features, dtype=torch.float16, device=x.device)
        del product, row_scale
        return out

    @staticmethod
    def backward(ctx, grad_output):
        module = ctx.module
        weight = torch.empty(module.out_features, module.in_features, dtype=ctx.input_dtype, device=grad_output.device)
        scale = torch.empty(module.out_features, 1, dtype=torch.float32, device=grad_output.device)
        grad_input = grad_output.to(ctx.input_dtype) @ weight
        del weight, scale
        return grad_input, None


class Int8LinearReplica(nn.Linear):
    """bitsandbytes Linear8bitLt (LLM.int8), allocation for allocation (outlier columns not modelled)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Int8MatMul.apply(x, self)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)


def lora_wrappers() -> dict[type[nn.Module], type[nn.Module]]:
    """peft's bitsandbytes LoRA layers, for the replicas (what a CUDA run with bitsandbytes gets)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # no bitsandbytes on this platform: peft's plain Linear wraps them
        return {}
    return {Nf4LinearReplica: Linear4bit, Int8LinearReplica: Linear8bitLt}


def _projection_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer transformers' replace_with_bnb_linear converts: nn.Linear, and
    GPT-2's Conv1D (weight stored in x out, transposed before quantization); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return None


def _decoder_linears(model, spec: ModelSpec):
    """(parent module, attribute, layer, (in, out)) for every projection inside the decoder layers."""
    names = {name.split(".")[-1] for name in spec.linear_names}
    for module_name, module in model.named_modules():
        if ".layers." not in f".{module_name}." and ".h." not in f".{module_name}.":
            continue
        for child_name, child in module.named_children():
            shape = _projection_shape(child) if child_name in names else None
            if shape is not None:
                yield module, child_name, child, shape


def quantize_linears(model, spec: ModelSpec, *, quant: str, compute_dtype: torch.dtype, backend: str,
                     legacy: bool = False) -> None:
    """Replace the decoder layers' projections by quantized ones (the frozen base of QLoRA), as transformers'
    replace_with_bnb_linear does: GPT-2's Conv1D layers included. legacy: the replicas behave as bitsandbytes
    before 0.43.2 (bitsandbytes itself behaves as the installed release)."""
    replaced = []
    for parent, name, layer, (in_features, out_features) in list(_decoder_linears(model, spec)):
        if backend == "bitsandbytes":
            module = _bitsandbytes_linear(layer, in_features, out_features, quant, compute_dtype)
        elif quant == "nf4":
            module = Nf4LinearReplica(in_features, out_features, layer.bias is not None, compute_dtype,
                                      device=layer.weight.device, keeps_input=legacy)
        else:
            module = Int8LinearReplica(in_features, out_features, layer.bias is not None, compute_dtype,
                                       device=layer.weight.device)
        setattr(parent, name, module)
        replaced.append(name)
    model.memtui_replaced = replaced


def _bitsandbytes_linear(layer: nn.Module, in_features: int, out_features: int, quant: str, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    device = layer.weight.device
    # nn.Linear stores out x in; Conv1D in x out, which transformers transposes before quantizing.
    weight = layer.weight.data if isinstance(layer, nn.Linear) else layer.weight.data.T.contiguous()
    if quant == "nf4":
        module = bnb.nn.Linear4bit(in_features, out_features, bias=layer.bias is not None,
                                   compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        module.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True)
    else:
        module = bnb.nn.Linear8bitLt(in_features, out_features, bias=layer.bias is not None,
                                     has_fp16_weights=False, threshold=6.0)
        module.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.data.to(compute_dtype), requires_grad=False)
    return module.to(device)  # quantizes on the move to CUDA


def adamw_8bit(params, *, device_type: str):
    """bitsandbytes' AdamW8bit on CUDA; the allocation-exact replica elsewhere."""
    if device_type == "cuda" and torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.01)
    from memtui.engine.torchside.optim import BnbAdamReplica

    return BnbAdamReplica(params, optim_bits=8, paged=False)
