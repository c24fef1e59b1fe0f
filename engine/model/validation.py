"""Checks that need the model and the GPU, not just the option's own range.

Each failure is an InputError naming the CLI flag and what is allowed, so the
CLI prints one line and the TUI shows it beside the field.
"""

from __future__ import annotations

from pydantic import ValidationError

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.errors import InputError
from memtui.engine.model.specs import GpuSpec, TrainingConfig


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def config_from_options(options: dict) -> TrainingConfig:
    """Build a TrainingConfig, turning pydantic's error into a one-line InputError."""
    try:
        return TrainingConfig.model_validate(options)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "config"
        allowed = None
        context = first.get("ctx") or {}
        if "expected" in context:
            allowed = str(context["expected"]).replace("'", "")
        message = first["msg"]
        if first["type"] == "literal_error":
            message = f"{first['input']!r} is not a valid choice"
        elif first["type"] == "extra_forbidden":
            message = "unknown option"
            allowed = ", ".join(TrainingConfig.model_fields)
        raise InputError(flag_name(field), message, allowed) from None


def resolve_lora_targets(config: TrainingConfig, model: ModelSpec) -> tuple[str, ...]:
    """The linear layer names LoRA adapts; 'all-linear' means every one peft would pick."""
    if not config.uses_lora:
        return ()
    adaptable = tuple(linear.name for linear in model.linears if linear.experts == 1)
    raw = [part.strip() for part in config.lora_targets.split(",") if part.strip()]
    if not raw:
        raise InputError("--lora-targets", "is empty", "all-linear or a comma list of " + ", ".join(adaptable))
    if raw == ["all-linear"]:
        return adaptable
    chosen: list[str] = []
    for name in raw:
        # "c_proj" in GPT-2 names both attn.c_proj and mlp.c_proj, as peft's suffix match does.
        matches = [candidate for candidate in adaptable if candidate == name or candidate.endswith("." + name)]
        if not matches:
            raise InputError(
                "--lora-targets",
                f"{name!r} is not a linear layer of {model.id}",
                "all-linear, " + ", ".join(adaptable),
            )
        chosen.extend(match for match in matches if match not in chosen)
    return tuple(chosen)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


UNFUSED_OPTIMIZERS = ("adafactor", "lion", "galore-adamw")  # no fused kernel: `fused` runs as for-loop


def check_config(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec) -> list[str]:
    """Raise InputError for impossible combinations; return notes for questionable ones."""
    notes: list[str] = []
    if model.num_heads % config.tp:
        raise InputError(
            "--tp", f"{config.tp} does not divide {model.id}'s {model.num_heads} attention heads",
            _divisors(model.num_heads),
        )
    if config.gpus % (config.tp * config.pp):
        raise InputError(
            "--gpus", f"{config.gpus} is not a multiple of tp x pp = {config.tp * config.pp}",
            f"multiples of {config.tp * config.pp}",
        )
    if model.num_kv_heads % config.tp and config.tp % model.num_kv_heads:
        raise InputError(
            "--tp", f"{config.tp} neither divides nor is a multiple of {model.num_kv_heads} key/value heads",
            _divisors(model.num_heads),
        )
    if model.is_moe is False and config.tp > 1 and model.intermediate_size % config.tp:
        raise InputError("--tp", f"{config.tp} does not divide intermediate size {model.intermediate_size}")
    if config.pp > model.num_layers:
        raise InputError("--pp", f"{config.pp} stages for {model.num_layers} layers", f"1..{model.num_layers}")
    if config.uses_lora:
        targets = resolve_lora_targets(config, model)
        if not targets:
            raise InputError("--lora-targets", f"{model.id} has no linear layer LoRA can adapt")
        limit = min(min(model.linear(name).in_features, model.linear(name).out_features) for name in targets)
        if config.lora_rank > limit:
            raise InputError("--lora-rank", f"{config.lora_rank} exceeds the smallest adapted dimension", f"1..{limit}")
        if config.optimizer == "galore-adamw":
            raise InputError("--optimizer", "galore-adamw projects full-rank gradients; it does not combine with LoRA",
                             "adamw, adamw-8bit, sgd, sgd-momentum, adafactor, lion")
    if config.optimizer == "galore-adamw":
        limit = min(model.hidden_size, model.intermediate_size)
        if config.galore_rank > limit:
            raise InputError("--galore-rank", f"{config.galore_rank} exceeds the hidden size", f"1..{limit}")
    if config.quant != "none" and not config.uses_lora:
        raise InputError("--quant", f"{config.quant} freezes the base weights; add --lora-rank R to train adapters",
                         "none, or int8/nf4 with --lora-rank")
    if config.quant != "none" and config.precision == "32-true":
        raise InputError("--quant", "quantized bases compute in 16 bits", "with 16-mixed, bf16-mixed, 16-true, bf16-true")
    if config.master_weights and config.precision not in ("16-true", "bf16-true"):
        raise InputError("--master-weights", f"needs 16-bit weights, not {config.precision}", "16-true, bf16-true")
    if config.offload == "optimizer+params" and config.zero != 3:
        raise InputError("--offload", "optimizer+params needs --zero 3 (parameters must be sharded to be offloaded)",
                         "none, optimizer")
    if config.offload != "none" and config.zero == 0:
        raise InputError("--offload", "offloading runs through ZeRO; set --zero 1, 2 or 3", "none")
    if config.zero and config.tp * config.pp == config.gpus and config.gpus == 1:
        notes.append("ZeRO shards across data-parallel ranks; with one GPU it changes nothing.")
    if config.optimizer_impl == "fused" and config.optimizer in UNFUSED_OPTIMIZERS:
        notes.append(f"{config.optimizer} has no fused kernel: it steps one tensor at a time (for-loop).")
    if model.positions == "learned" and config.seq_len > model.max_position_embeddings:
        raise InputError("--seq-len", f"{model.id} has {model.max_position_embeddings} learned positions",
                         f"1..{model.max_position_embeddings}")
    if config.seq_len > model.max_position_embeddings:
        notes.append(f"seq-len {config.seq_len} is beyond {model.id}'s {model.max_position_embeddings} trained positions.")
    if "bf16" in config.precision and not gpu.bf16:
        notes.append(f"{gpu.name} has no bf16 support; use 16-mixed or 16-true there.")
    if config.tp > 1 and config.attention == "eager":
        notes.append("eager attention under tensor parallelism keeps s x s scores per head shard.")
    if model.is_moe:
        notes.append("MoE: transformers' grouped_mm experts process tokens x top-k rows whatever the routing, "
                     "so the step's memory does not depend on which experts the router picks.")
        if config.quant != "none":
            notes.append(f"{config.quant}: bitsandbytes quantizes nn.Linear layers only; the experts' stacked "
                         "weights stay 16-bit (as transformers loads them).")
    if config.quant != "none" and model.family == "gpt2":
        notes.append(f"{config.quant}: GPT-2's layers are Conv1D, not nn.Linear, so bitsandbytes quantizes none "
                     "of them; the weights stay 16-bit.")
    return notes
