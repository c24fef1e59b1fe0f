"""The training flags shared by estimate, trace, run and fit, and their merge into a TrainingConfig.

Precedence: TrainingConfig defaults < --recipe < flags given on the command line.
Every flag defaults to None so we know which ones the user actually typed.
"""

from __future__ import annotations

import argparse

from memtui.engine.errors import InputError
from memtui.engine.model.presets import resolve_recipe
from memtui.engine.model.specs import (
    ATTENTIONS,
    CHECKPOINTING,
    OFFLOADS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
    QUANTS,
    TrainingConfig,
)
from memtui.engine.model.validation import config_from_options

_DEFAULTS = TrainingConfig()


def _number(flag: str, kind: type, allowed, rule: str):
    """An argparse type: `kind(text)` for which `allowed(value)` holds, else a one-line error naming the flag."""
    noun = "whole number" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a {noun}") from None
        if not allowed(value):
            raise argparse.ArgumentTypeError(f"{flag}: must be {rule}, got {text}")
        return value

    return parse


def _positive_int(flag: str):
    return _number(flag, int, lambda value: value >= 1, "at least 1")


def _non_negative_int(flag: str):
    return _number(flag, int, lambda value: value >= 0, "0 or more")


def _positive_float(flag: str):
    return _number(flag, float, lambda value: value > 0, "more than 0")  # NaN fails too


def _choice(flag: str, choices: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a valid choice (allowed: {', '.join(choices)})")
        return text

    return parse


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    group = parser.add_argument_group("model and hardware")
    group.add_argument("--model", help=f"preset id or path to a config.json (default {d.model})")
    group.add_argument("--gpu", help=f"GPU preset id (default {d.gpu})")
    group.add_argument("--gpus", type=_positive_int("--gpus"), help="total GPUs; data-parallel ranks = gpus / (tp x pp) (default 1)")
    group.add_argument("--recipe", help="apply a named option set first (see `memtui presets`)")
    group = parser.add_argument_group("workload")
    group.add_argument("--batch-size", type=_positive_int("--batch-size"), help=f"micro-batch per data-parallel rank (default {d.batch_size})")
    group.add_argument("--seq-len", type=_positive_int("--seq-len"), help=f"tokens per sequence (default {d.seq_len})")
    group = parser.add_argument_group("optimizations")
    group.add_argument("--precision", type=_choice("--precision", PRECISIONS), help=f"{', '.join(PRECISIONS)} (default {d.precision})")
    group.add_argument("--master-weights", action=argparse.BooleanOptionalAction, default=None,
                       help="keep an fp32 master copy in the optimizer (with 16-true / bf16-true)")
    group.add_argument("--optimizer", type=_choice("--optimizer", OPTIMIZERS), help=f"{', '.join(OPTIMIZERS)} (default {d.optimizer})")
    group.add_argument("--optimizer-impl", type=_choice("--optimizer-impl", OPTIMIZER_IMPLS),
                       help=f"{', '.join(OPTIMIZER_IMPLS)} (default {d.optimizer_impl})")
    group.add_argument("--galore-rank", type=_positive_int("--galore-rank"), help=f"GaLore projection rank (default {d.galore_rank})")
    group.add_argument("--checkpointing", type=_choice("--checkpointing", CHECKPOINTING),
                       help=f"activation checkpointing: {', '.join(CHECKPOINTING)} (default {d.checkpointing})")
    group.add_argument("--attention", type=_choice("--attention", ATTENTIONS),
                       help=f"eager (s x s scores) or flash (SDPA) (default {d.attention})")
    group.add_argument("--zero", type=_choice("--zero", ("0", "1", "2", "3")), help="ZeRO stage 0-3; 3 = FSDP (default 0)")
    group.add_argument("--offload", type=_choice("--offload", OFFLOADS), help=f"{', '.join(OFFLOADS)} (default none)")
    group.add_argument("--tp", type=_positive_int("--tp"), help="tensor-parallel ranks, with sequence parallel (default 1)")
    group.add_argument("--pp", type=_positive_int("--pp"), help="pipeline stages, 1F1B schedule (default 1)")
    group.add_argument("--lora-rank", type=_non_negative_int("--lora-rank"), help="LoRA rank; 0 trains all weights (default 0)")
    group.add_argument("--lora-targets", help=f"comma list of linear layers or all-linear (default {d.lora_targets})")
    group.add_argument("--quant", type=_choice("--quant", QUANTS), help="frozen base weights: none, int8, nf4 (nf4 + LoRA = QLoRA)")


def config_from_args(args: argparse.Namespace, **overrides) -> TrainingConfig:
    """Defaults, then the recipe, then the flags typed, then any overrides."""
    options: dict = {}
    if getattr(args, "recipe", None):
        options.update(resolve_recipe(args.recipe).options)
    for field in TrainingConfig.model_fields:
        value = getattr(args, field, None)
        if value is not None:
            options[field] = int(value) if field == "zero" else value
    options.update(overrides)
    if "seq_len" not in options:
        # A model with learned positions (GPT-2) cannot take the default length; use its own.
        from memtui.engine.model.presets import resolve_model

        spec = resolve_model(options.get("model", _DEFAULTS.model))
        if spec.positions == "learned":
            options["seq_len"] = min(_DEFAULTS.seq_len, spec.max_position_embeddings)
    if "gpus" not in options and options.get("tp", 1) * options.get("pp", 1) > 1:
        options["gpus"] = options.get("tp", 1) * options.get("pp", 1)  # --tp 8 alone means 8 GPUs
    return config_from_options(options)


__all__ = ["InputError", "add_training_flags", "config_from_args"]
