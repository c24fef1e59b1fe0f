"""Make SDPA on CPU take the path CUDA takes: a fused kernel with O(s) memory.

On CUDA, `scaled_dot_product_attention` runs FlashAttention (16-bit) or the
memory-efficient kernel (fp32), both of which save q, k, v, the output and a
per-row logsumexp, support dropout by replaying the RNG, and handle grouped
key/value heads natively. CPU SDPA falls back to the math kernel (s x s scores
and a dropout mask) whenever dropout is on, which would make a CPU trace of
GPT-2 look nothing like a CUDA step. While `cuda_sdpa()` is active, SDPA calls
the CPU flash kernel directly, with autocast's cast of its inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

_original = F.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in (query, key, value))
    if value.shape[-1] != query.shape[-1]:
        return _efficient_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
    out, _logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


def _efficient_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """Values narrower than queries and keys (DeepSeek-V3's latent attention): CUDA's flash kernel needs one head
    size, so SDPA runs the memory-efficient kernel (output of the values' width, a logsumexp padded to 32 rows).
    Its meta function serves fake tensors; real CPU tensors take SDPA's own CPU path."""
    if not isinstance(query, FakeTensor):
        return _original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    out, _logsumexp, _seed, _offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)
    return out


@contextlib.contextmanager
def cuda_sdpa() -> Iterator[None]:
    F.scaled_dot_product_attention = _flash_sdpa
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _original
