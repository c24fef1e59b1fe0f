"""Make `softmax(x, dtype=torch.float32)` of a Half tensor allocate what CUDA's allocates.

ATen's softmax (aten/src/ATen/native/SoftMax.cpp) casts inside the kernel only on CUDA:

    if (input_.is_cuda() && input_.scalar_type() == ScalarType::Half && dtype == ScalarType::Float)
        return at::_softmax(input_, dim_, true);           // half_to_float: the fp32 output alone
    Tensor converted = dtype.has_value() ? input_.toType(dtype.value()) : input_;
    return at::_softmax(converted, dim_, false);           // a full-size cast first

and `_softmax_backward_data` then writes the Half gradient directly, where the CPU path makes an fp32 gradient
and casts it. Eager attention asks for exactly this (transformers' `softmax(scores, dtype=torch.float32)`, and
CUDA autocast's fp32_set_opt_dtype policy passes dtype=float32 to GPT-2's), so a CPU trace of an fp16 step would
keep an fp32 copy of the scores that a GPU never makes. bf16 takes the cast on CUDA too. While `cuda_softmax()`
is active, softmax.int runs the CUDA branch on fake tensors (their meta kernels accept half_to_float; CPU's own
kernel does not, so real CPU tensors keep the CPU path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake


def _softmax(input, dim, dtype=None):  # noqa: A002 - aten::softmax.int's own signature
    if input.dtype == torch.float16 and dtype == torch.float32 and is_fake(input):
        return torch.ops.aten._softmax(input, dim, True)
    converted = input.to(dtype) if dtype is not None else input
    return torch.ops.aten._softmax(converted, dim, False)


@contextlib.contextmanager
def cuda_softmax() -> Iterator[None]:
    # softmax.int is CompositeImplicitAutograd: a kernel on the autograd key takes its place, below autocast (whose
    # fp32_set_opt_dtype policy has set the dtype by then) and above autograd's recording of _softmax.
    library = torch.library.Library("aten", "IMPL")
    try:
        library.impl("softmax.int", _softmax, "AutogradCPU")
        yield
    finally:
        library._destroy()
