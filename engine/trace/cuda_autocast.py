"""Make CPU autocast behave like CUDA autocast, so a CPU trace predicts a CUDA step.

CPU and CUDA autocast cast the same matmuls to 16 bits, but CUDA also runs a
list of numerically sensitive ops in fp32 that CPU autocast leaves alone:
`pow`, `softmax` without a dtype, `layer_norm`, `exp`, `sum`... GPT-2's
`gelu_new` (a `pow`) and its eager softmax therefore allocate fp32 tensors on
CUDA and 16-bit ones on CPU. While `cuda_autocast_policy()` is active we
register CUDA's policy for those ops on the AutocastCPU key (the lists are
PyTorch's, aten/src/ATen/autocast_mode.cpp), and remove it on exit.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch._C import DispatchKey, DispatchKeySet

_LOW = (torch.float16, torch.bfloat16)
_EXCLUDE_AUTOCAST = DispatchKeySet(DispatchKey.AutocastCPU)

# CUDA's "fp32" policy: every floating input is cast to fp32 first.
_FP32_OPS = (
    "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "rsqrt", "exp", "expm1", "log", "log1p", "log2",
    "log10", "reciprocal", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "layer_norm",
    "group_norm", "logsumexp", "cosine_similarity", "dist", "cdist", "renorm",
)
# CUDA's "fp32_set_opt_dtype" policy: run in fp32 by passing dtype=float32 when none is given.
_FP32_OPT_DTYPE_OPS = ("softmax.int", "log_softmax.int", "sum", "sum.dim_IntList", "cumsum", "cumprod", "prod")


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype in _LOW:
        return value.to(torch.float32)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(item) for item in value)
    return value


def _op(qualified: str):
    name, _, overload = qualified.partition(".")
    packet = getattr(torch.ops.aten, name)
    return getattr(packet, overload or "default")


def _fp32_kernel(op):
    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE_AUTOCAST):
            return op(*_to_fp32(args), **{key: _to_fp32(value) for key, value in kwargs.items()})

    return kernel


def _opt_dtype_kernel(op, dtype_position: int):
    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE_AUTOCAST):
            first = args[0]
            has_dtype = kwargs.get("dtype") is not None or (len(args) > dtype_position and args[dtype_position] is not None)
            if not has_dtype and isinstance(first, torch.Tensor) and first.dtype in _LOW:
                if len(args) > dtype_position:
                    args = (*args[:dtype_position], torch.float32, *args[dtype_position + 1 :])
                else:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)

    return kernel


# Where each opt-dtype op takes its dtype argument (positional index).
_DTYPE_POSITION = {
    "softmax.int": 2, "log_softmax.int": 2, "sum": 1, "sum.dim_IntList": 3, "cumsum": 2, "cumprod": 2, "prod": 1,
}


_policy_depth = 0


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Register CUDA's fp32 autocast policy on the CPU autocast key for the duration (re-entrant), and
    answer `torch.is_autocast_enabled()` for CUDA from the CPU autocast state (cuda_autocast_queries).

    The trace keeps both through backward too: a checkpointed region's recompute re-enters autocast there,
    and must cast as the forward did (peft's LoRA layers ask whether autocast is on; a different answer in
    the recompute runs other casts, which selective checkpointing refuses as a storage mismatch)."""
    global _policy_depth
    if _policy_depth:
        _policy_depth += 1
        try:
            yield
        finally:
            _policy_depth -= 1
        return
    _policy_depth = 1
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            # Overriding a kernel prints a warning per op; it is intended here.
            warnings.simplefilter("ignore")
            for qualified in _FP32_OPS:
                library.impl(qualified, _fp32_kernel(_op(qualified)), "AutocastCPU")
            for qualified in _FP32_OPT_DTYPE_OPS:
                library.impl(qualified, _opt_dtype_kernel(_op(qualified), _DTYPE_POSITION[qualified]), "AutocastCPU")
        with cuda_autocast_queries():
            yield
    finally:
        _policy_depth = 0
        library._destroy()


@contextlib.contextmanager
def cuda_autocast_queries() -> Iterator[None]:
    """`torch.is_autocast_enabled()` asks about CUDA; here CUDA autocast is the CPU one.

    peft's bitsandbytes LoRA layers skip their dtype conversions when autocast is on; the dtype CUDA autocast
    casts to (`torch.get_autocast_gpu_dtype()`) is the CPU one's too.
    """
    original = torch.is_autocast_enabled

    def is_enabled(device_type: str | None = None) -> bool:
        return original("cpu" if device_type in (None, "cuda") else device_type)

    original_dtype = torch.get_autocast_gpu_dtype

    def gpu_dtype() -> torch.dtype:  # torchao's Float8Linear casts its input to it (torchside/float8.py)
        return torch.get_autocast_dtype("cpu")

    torch.is_autocast_enabled = is_enabled
    torch.get_autocast_gpu_dtype = gpu_dtype
    try:
        yield
    finally:
        torch.is_autocast_enabled = original
        torch.get_autocast_gpu_dtype = original_dtype


@contextlib.contextmanager
def cuda_like_autocast(dtype: torch.dtype) -> Iterator[None]:
    """CPU autocast to `dtype` with CUDA's op policy."""
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=dtype):
        yield
