"""The scaled-down model a live run trains: same family and options, fewer layers, narrower if needed.

Scaling keeps what decides memory per token and per parameter: the family's
layer layout, head_dim, the grouped-query ratio (heads per key/value head),
the MLP's width relative to the hidden size, and every training option. It
shrinks, in this order and only what the user did not fix: layers, width
(key/value heads halved, heads and hidden size following), vocabulary, then
sequence length and batch, until the predicted run fits the memory target
and its estimated time. The tokens per step start scaled by the width ratio,
which keeps activations' share of the peak (and the phase it falls in) as in
the full configuration, where that peak holds activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from memtui.engine.model.architectures import ModelSpec, model_spec_from_config
from memtui.engine.errors import InputError

# Families whose transformers config derives head_dim from hidden_size / heads.
_DERIVED_HEAD_DIM = {"qwen2", "phi3", "gpt2"}
_MIN_VOCAB = 1024
_MIN_SEQ = 64


@dataclass(frozen=True)
class Shape:
    """The dimensions of a scaled run; `fixed` names those the user set (never shrunk)."""

    layers: int
    kv_heads: int
    vocab: int
    seq_len: int
    batch_size: int
    fixed: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class SizingDefaults:
    """Starting point per device kind, before the fit loop shrinks anything."""

    layers: int
    max_hidden: int | None  # None: full width
    max_vocab: int | None
    max_seq_len: int | None
    max_batch_size: int | None
    flops_per_second: float  # for the time guard; deliberately conservative
    time_budget_s: float = 40.0


CPU_DEFAULTS = SizingDefaults(layers=2, max_hidden=512, max_vocab=8192, max_seq_len=256, max_batch_size=1,
                              flops_per_second=8e9)
CUDA_DEFAULTS = SizingDefaults(layers=4, max_hidden=None, max_vocab=None, max_seq_len=None, max_batch_size=None,
                               flops_per_second=5e13)


def group_size(spec: ModelSpec) -> int:
    return spec.num_heads // spec.num_kv_heads


def kv_for_width(spec: ModelSpec, width: int) -> int:
    """Key/value heads whose scaled hidden size is closest to `width` (at least one)."""
    candidates = range(1, spec.num_kv_heads + 1)
    return min(candidates, key=lambda kv: (abs(_hidden_for(spec, kv) - width), -kv))


def _hidden_for(spec: ModelSpec, kv_heads: int) -> int:
    heads = kv_heads * group_size(spec)
    if spec.family in _DERIVED_HEAD_DIM:
        return heads * spec.head_dim
    scaled = spec.hidden_size * heads / spec.num_heads
    return max(16, int(round(scaled / 16)) * 16)


def _round16(value: float) -> int:
    return max(16, int(round(value / 16)) * 16)


def scaled_config(spec: ModelSpec, shape: Shape) -> dict[str, Any]:
    """The config.json of the scaled model (a modified copy of the full one)."""
    config = copy.deepcopy(spec.hf_config())
    meta = dict(spec.config.get("_memtui", {}))
    heads = shape.kv_heads * group_size(spec)
    hidden = _hidden_for(spec, shape.kv_heads)
    ratio = hidden / spec.hidden_size
    if spec.family == "gpt2":
        config.update(n_layer=shape.layers, n_head=heads, n_embd=hidden, vocab_size=shape.vocab)
        if config.get("n_inner"):
            config["n_inner"] = _round16(config["n_inner"] * ratio)
    else:
        config.update(
            num_hidden_layers=shape.layers, num_attention_heads=heads, num_key_value_heads=shape.kv_heads,
            hidden_size=hidden, intermediate_size=_round16(spec.intermediate_size * ratio), vocab_size=shape.vocab,
        )
        if spec.family not in _DERIVED_HEAD_DIM:
            config["head_dim"] = spec.head_dim
        for key in ("layer_types",):
            if isinstance(config.get(key), list):
                config[key] = config[key][: shape.layers]
        if spec.family == "deepseek_v3":
            # The dense layers' MLP is intermediate_size (spec.intermediate_size is the experts'); the copy keeps
            # at least one MoE layer after its dense ones.
            config["intermediate_size"] = _round16(int(spec.config["intermediate_size"]) * ratio)
            config["first_k_dense_replace"] = min(spec.dense_layers, max(shape.layers - 1, 0))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        ids = value if isinstance(value, list) else [value]
        if any(isinstance(token, int) and token >= shape.vocab for token in ids):
            config[key] = None  # the token ids of the full vocabulary do not exist in the scaled one
    meta["name"] = f"{meta.get('name', spec.id)} (scaled: {shape.layers} layers, hidden {hidden})"
    meta["scaled_from"] = spec.id
    config["_memtui"] = meta
    return config


def scaled_spec(spec: ModelSpec, shape: Shape) -> ModelSpec:
    return model_spec_from_config(
        scaled_config(spec, shape), model_id=f"{spec.id}-live-{shape.layers}l-{_hidden_for(spec, shape.kv_heads)}h",
        source=f"{spec.id} scaled for a live run",
    )


def initial_shape(
    spec: ModelSpec, seq_len: int, batch_size: int, defaults: SizingDefaults, *, layers: int | None = None,
    width: int | None = None, vocab: int | None = None, fixed_seq_len: bool = False, fixed_batch_size: bool = False,
    activations_at_peak: bool = False,
) -> Shape:
    """The starting shape: the user's choices as given, the rest from the device defaults (`activations_at_peak`:
    the full configuration's peak holds activations; the copy's tokens then keep their share)."""
    fixed: set[str] = set()
    if layers is not None:
        if layers > spec.num_layers:
            raise InputError("--layers", f"{layers} exceeds {spec.id}'s {spec.num_layers} layers", f"1..{spec.num_layers}")
        fixed.add("layers")
    else:
        layers = min(spec.num_layers, defaults.layers)
    if width is not None:
        if width > spec.hidden_size:
            raise InputError("--width", f"{width} exceeds {spec.id}'s hidden size {spec.hidden_size}",
                             f"up to {spec.hidden_size}")
        kv = kv_for_width(spec, width)
        fixed.add("width")
    elif defaults.max_hidden is not None:
        fitting = [kv for kv in range(1, spec.num_kv_heads + 1) if _hidden_for(spec, kv) <= defaults.max_hidden]
        kv = max(fitting) if fitting else 1
    else:
        kv = spec.num_kv_heads
    if vocab is not None:
        if vocab > spec.vocab_size:
            raise InputError("--vocab", f"{vocab} exceeds {spec.id}'s vocabulary of {spec.vocab_size}",
                             f"up to {spec.vocab_size}")
        fixed.add("vocab")
    else:
        vocab = min(spec.vocab_size, defaults.max_vocab or spec.vocab_size)
    # Activations grow with tokens x width, model states with width x width: with its tokens scaled by the width
    # ratio the copy keeps the full configuration's share of activations, and so peaks in the same phase. Where
    # the full configuration has activations at its peak the device's caps only limit what that share does not
    # ask for (the time guard shrinks it further if need be); where it peaks with none (in the optimizer step)
    # fewer tokens peak there too, and the caps hold.
    matched = -(-seq_len * batch_size * _hidden_for(spec, kv) // spec.hidden_size) if activations_at_peak else 0
    if fixed_seq_len:
        fixed.add("seq_len")
    elif defaults.max_seq_len is not None:
        seq_len = min(seq_len, max(defaults.max_seq_len, matched))
    if fixed_batch_size:
        fixed.add("batch_size")
    elif defaults.max_batch_size is not None:
        batch_size = min(batch_size, max(defaults.max_batch_size, -(-matched // seq_len)))
    return Shape(layers=layers, kv_heads=kv, vocab=vocab, seq_len=seq_len, batch_size=batch_size, fixed=frozenset(fixed))


def smaller(shape: Shape) -> Shape | None:
    """The next shape down the ladder, or None when nothing the user left free can shrink."""
    free = lambda name: name not in shape.fixed  # noqa: E731 - reads as a sentence below
    if free("layers") and shape.layers > 1:
        return replace(shape, layers=max(1, shape.layers // 2))
    if free("width") and shape.kv_heads > 1:
        return replace(shape, kv_heads=max(1, shape.kv_heads // 2))
    if free("vocab") and shape.vocab > _MIN_VOCAB:
        return replace(shape, vocab=max(_MIN_VOCAB, shape.vocab // 2))
    if free("seq_len") and shape.seq_len > _MIN_SEQ:
        return replace(shape, seq_len=max(_MIN_SEQ, shape.seq_len // 2))
    if free("batch_size") and shape.batch_size > 1:
        return replace(shape, batch_size=max(1, shape.batch_size // 2))
    return None


def step_flops(spec: ModelSpec, seq_len: int, batch_size: int) -> float:
    """Forward + backward FLOPs of one step: 6 per parameter per token, plus attention scores."""
    tokens = seq_len * batch_size
    attention = 12 * spec.num_layers * spec.num_heads * spec.head_dim * seq_len * tokens
    return 6.0 * spec.params * tokens + attention


def describe_changes(full: ModelSpec, scaled: ModelSpec, seq_len: int, batch_size: int, shape: Shape) -> list[str]:
    changes = []
    if scaled.num_layers != full.num_layers:
        changes.append(f"layers {full.num_layers} -> {scaled.num_layers}")
    if scaled.hidden_size != full.hidden_size:
        changes.append(
            f"hidden {full.hidden_size} -> {scaled.hidden_size} (heads {full.num_heads} -> {scaled.num_heads}, "
            f"kv heads {full.num_kv_heads} -> {scaled.num_kv_heads}, head_dim {scaled.head_dim} kept), "
            f"intermediate {full.intermediate_size} -> {scaled.intermediate_size}"
        )
    if scaled.vocab_size != full.vocab_size:
        changes.append(f"vocab {full.vocab_size} -> {scaled.vocab_size}")
    if shape.seq_len != seq_len:
        changes.append(f"seq-len {seq_len} -> {shape.seq_len}")
    if shape.batch_size != batch_size:
        changes.append(f"batch-size {batch_size} -> {shape.batch_size}")
    return changes
