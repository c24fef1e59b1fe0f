"""Make dropout on CPU allocate what CUDA's allocates.

On CUDA, `F.dropout` in training runs the fused `native_dropout` kernel: the
output and a one-byte mask saved for backward. On CPU, ATen decomposes it into
`empty_like(x).bernoulli_()` and a multiply, saving a noise tensor in the
input's dtype (4 bytes per element in fp32), which would make a CPU trace of
GPT-2 (dropout 0.1 everywhere) overstate what a GPU step keeps. While
`cuda_dropout()` is active, training-mode dropout calls `native_dropout`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_original = F.dropout


def _fused_dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - F.dropout's own signature
    if not training or p == 0.0:
        return input
    if p == 1.0 or inplace:
        return _original(input, p, training, inplace)
    output, _mask = torch.native_dropout(input, p, True)
    return output


@contextlib.contextmanager
def cuda_dropout() -> Iterator[None]:
    F.dropout = _fused_dropout
    try:
        yield
    finally:
        F.dropout = _original
