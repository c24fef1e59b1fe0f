"""Activation memory: what the forward pass saves for backward, per decoder layer.

Version 1: closed forms per tensor, derived from the transformers decoder
layers (RMSNorm in fp32, SwiGLU, GQA, RoPE) and checked against traces in
tests/test_accuracy.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import TrainingConfig


@dataclass(frozen=True)
class ActivationCost:
    per_layer_saved: int  # bytes one decoder layer keeps for backward
    layer_forward_transient: int  # extra bytes at the peak inside one layer's forward
    layer_backward_transient: int  # extra bytes at the peak inside one layer's backward
    embedding_saved: int  # embedding output (the first layer's input) and friends
    head_saved: int  # final norm + lm_head input + loss tensors kept for backward
    loss_forward_transient: int
    loss_backward_transient: int  # peak of the loss/lm_head backward, beyond head_saved
    autocast_weight_copies: int  # 16-bit weight copies autocast caches during forward


def activation_cost(config: TrainingConfig, model: ModelSpec, *, layers: int, linear_weight_params: int) -> ActivationCost:
    b, s = config.batch_size, config.seq_len
    tp = config.tp
    tokens = b * s
    seq_shard = tp if tp > 1 else 1  # sequence parallel splits what is outside attention/MLP
    h = model.hidden_size
    q = model.q_dim // tp
    kv = max(model.kv_dim // tp, model.head_dim)
    inter = model.intermediate_size // tp
    heads = model.num_heads // tp
    c = config.compute_bytes
    residual = 4 if config.precision != "16-true" and config.precision != "bf16-true" else 2
    if config.precision == "32-true":
        residual = 4

    norm_saved = tokens * h * (residual + 4) // seq_shard + tokens * 4
    if config.autocast:
        qkv_inputs = 3 * tokens * h * c
        mlp_inputs = 2 * tokens * h * c
    else:
        qkv_inputs = tokens * h * c
        mlp_inputs = tokens * h * c
    attention_saved = tokens * (2 * q + 2 * kv) * c + 4 * b * heads * s
    if config.attention == "eager":
        attention_saved += b * heads * s * s * (c + 1 + c)  # scores, dropout mask, probabilities
    if model.is_moe:
        routed = tokens * model.experts_per_token
        mlp_saved = routed * inter * 4 * c + routed * h * c
    elif model.family == "gpt2":
        mlp_saved = tokens * inter * c * 6
    else:
        mlp_saved = tokens * inter * 4 * c
    per_layer = 2 * norm_saved + qkv_inputs + mlp_inputs + attention_saved + mlp_saved
    forward_transient = tokens * inter * c * 2

    if config.checkpointing == "full":
        recompute = per_layer
        per_layer = tokens * h * residual // seq_shard
        backward_transient = recompute + tokens * inter * c * 2
    elif config.checkpointing == "selective":
        if config.attention == "eager":
            per_layer -= b * heads * s * s * (c + 1 + c)
        backward_transient = tokens * inter * c * 2 + (b * heads * s * s * 4 if config.attention == "eager" else 0)
    else:
        backward_transient = tokens * inter * c * 2

    vocab = model.vocab_size // tp
    embedding_saved = tokens * h * residual // seq_shard
    head_saved = norm_saved + tokens * h * c + tokens * vocab * 4
    loss_forward = tokens * vocab * (4 + c)
    loss_backward = tokens * vocab * 8
    autocast_copies = linear_weight_params * c if config.autocast else 0
    return ActivationCost(
        per_layer_saved=per_layer,
        layer_forward_transient=forward_transient,
        layer_backward_transient=backward_transient,
        embedding_saved=embedding_saved,
        head_saved=head_saved,
        loss_forward_transient=loss_forward,
        loss_backward_transient=loss_backward,
        autocast_weight_copies=autocast_copies,
    )
