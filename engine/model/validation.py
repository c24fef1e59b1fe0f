"""Checks that need the model and the GPU, not just the option's own range.

Each failure is an InputError naming the TrainingConfig field and what is
allowed (options inside the text as "{field}"), so the CLI prints one line with
its flags and the planner shows it beside the field in its own words.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from pydantic import ValidationError

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import EAGER_ONLY_FAMILIES, LinearLayer, ModelSpec
from memtui.engine.model.specs import GpuSpec, TrainingConfig


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
        raise InputError(field, message, allowed) from None


HEAD_TARGET = "lm_head"  # peft's name (transformers' CausalLM.lm_head) for the output head as a LoRA target


def resolve_lora_targets(config: TrainingConfig, model: ModelSpec) -> tuple[str, ...]:
    """The decoder layers' linear layer names LoRA adapts; 'all-linear' means every one peft would pick (peft's
    all-linear leaves the output head out; `lm_head` in the list adds it: see adapts_head)."""
    if not config.uses_lora:
        return ()
    if model.family == "deepseek_v3":
        return _deepseek_lora_targets(config.lora_targets, model)
    return _lora_targets(config.lora_targets, model.id, model.linears)


def adapts_head(config: TrainingConfig) -> bool:
    """Whether LoRA adapts the output head too (`lm_head` among --lora-targets; LitGPT's lora_head)."""
    return config.uses_lora and HEAD_TARGET in config.lora_targets and HEAD_TARGET in _target_names(config.lora_targets)


@lru_cache(maxsize=256)
def _target_names(targets: str) -> tuple[str, ...]:
    """The --lora-targets text split once per text: an estimate asks several times."""
    return tuple(part.strip() for part in targets.split(",") if part.strip())


# DeepSeek-V3's MLP names: peft (0.21, with transformers 5) maps them onto the routed experts' stacked weights,
# whose LoRA materialises every expert's delta weight each step, and adapts neither the dense nor the shared MLPs.
_DEEPSEEK_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def _deepseek_lora_targets(targets: str, model: ModelSpec) -> tuple[str, ...]:
    """DeepSeek-V3 adapts its attention projections (all-linear: every one of them)."""
    attention = tuple(linear for linear in model.linears
                      if linear.experts == 1 and linear.name not in _DEEPSEEK_MLP_NAMES)
    for name in (part.strip() for part in targets.split(",")):
        if name in _DEEPSEEK_MLP_NAMES:
            raise InputError(
                "lora_targets",
                f"{name!r}: for DeepSeek-V3, peft adapts the routed experts' stacked weights under this name (not the "
                "dense or shared MLPs), which memtui does not model",
                "all-linear (the attention projections), " + ", ".join(linear.name for linear in attention),
            )
    return _lora_targets(targets, model.id, attention)


@lru_cache(maxsize=256)
def _lora_targets(targets: str, model_id: str, linears: tuple[LinearLayer, ...]) -> tuple[str, ...]:
    """The --lora-targets text parsed once per (text, model): an estimate asks several times."""
    adaptable = tuple(linear.name for linear in linears if linear.experts == 1)
    allowed = "all-linear, " + ", ".join((*adaptable, HEAD_TARGET))
    raw = [part.strip() for part in targets.split(",") if part.strip()]
    if not raw:
        raise InputError("lora_targets", "is empty", "all-linear or a comma list of " + allowed.split(", ", 1)[1])
    layers = [name for name in raw if name != HEAD_TARGET]
    if layers == ["all-linear"]:
        return adaptable
    chosen: list[str] = []
    for name in layers:
        # "c_proj" in GPT-2 names both attn.c_proj and mlp.c_proj, as peft's suffix match does.
        matches = [candidate for candidate in adaptable if candidate == name or candidate.endswith("." + name)]
        if not matches:
            raise InputError("lora_targets", f"{name!r} is not a linear layer of {model_id}", allowed)
        chosen.extend(match for match in matches if match not in chosen)
    return tuple(chosen)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


UNFUSED_OPTIMIZERS = ("adafactor", "lion", "galore-adamw")  # no fused kernel: `fused` runs as for-loop
PAGED_OPTIMIZERS = ("paged-adamw-8bit", "paged-adamw")  # bitsandbytes' PagedAdamW8bit / PagedAdamW32bit


@dataclass
class Facts:
    """What a rule looks at: the options, the model, the GPU and the layers LoRA adapts."""

    config: TrainingConfig
    model: ModelSpec
    gpu: GpuSpec

    @cached_property
    def lora_targets(self) -> tuple[str, ...]:
        return resolve_lora_targets(self.config, self.model)  # may refuse: only asked once LoRA is on

    @cached_property
    def head(self) -> bool:
        return adapts_head(self.config)

    @property
    def smallest_adapted(self) -> int:
        sizes = [min(self.model.linear(name).in_features, self.model.linear(name).out_features)
                 for name in self.lora_targets]
        if self.head:
            sizes.append(min(self.model.hidden_size, self.model.vocab_size))
        return min(sizes)

    @property
    def ranks(self) -> int:
        return self.config.tp * self.config.pp

    @property
    def ddp_beside_tp(self) -> bool:
        """DDP (ZeRO-0 or 1) over data-parallel ranks beside tensor parallelism (PyTorch's _pre_dp_module_transform)."""
        return self.config.tp > 1 and self.config.dp > 1 and self.config.zero <= 1


Text = Callable[[Facts], str]


@dataclass(frozen=True)
class Rule:
    """One check: the options it involves (a refusal is reported on the first), when it is broken, what to say.

    A refusal raises InputError with `message` and `allowed`; a note (`refuse=False`) is only said.
    """

    fields: tuple[str, ...]
    broken: Callable[[Facts], bool]
    message: Text
    allowed: Text | None = None
    refuse: bool = True


def _rule(*fields: str, broken: Callable[[Facts], bool], message: Text, allowed: Text | None = None) -> Rule:
    return Rule(fields, broken, message, allowed)


# --modeling litgpt: the families whose LitGPT GPT is modelled (LLaMAMLP, RMSNorm, no biases, no soft-capping), and
# the linears its lora_mlp adapts together.
LITGPT_FAMILIES = ("llama", "mistral", "phi3")
LITGPT_MLP = ("gate_proj", "up_proj", "down_proj")
# Phi-3's fused projections, as the separate ones LitGPT's switches name (lora_query/key/value, lora_mlp).
_LITGPT_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def litgpt_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The adapted linears as LitGPT's GPT has them: q/k/v slices of its qkv, o_proj (proj), the MLP's three."""
    return tuple(name for target in targets for name in _LITGPT_NAMES.get(target, (target,)))

# The families whose layers the estimate compiles (engine/estimator/sim/compiled.py), each checked against
# `memtui trace --compile`.
COMPILED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe")


def unmodelled_compile(config: TrainingConfig, model: ModelSpec) -> str:
    """Why the estimate gives eager figures for a --compile config ("" when it models the compiled layers)."""
    if model.family not in COMPILED_FAMILIES:
        return f"{model.family} layers"
    if config.quant != "none":
        return f"{config.quant} layers"
    if config.checkpointing == "selective":
        return "selective checkpointing"
    if config.tp > 1:
        return "tensor parallelism"
    if config.float8 != "off":
        return "float8 linears"
    return ""


def _note(*fields: str, broken: Callable[[Facts], bool], message: Text) -> Rule:
    return Rule(fields, broken, message, refuse=False)


_FSDP2_OR_NO_TP: Text = lambda f: "2 or 3 (FSDP2), or {tp} 1"  # where DDP beside tensor parallelism is refused


# In the order they are checked; the first refusal wins. "{field}" in a text is that option's name.
RULES: tuple[Rule, ...] = (
    _rule("tp", broken=lambda f: f.model.num_heads % f.config.tp != 0,
          message=lambda f: f"{f.config.tp} does not divide {f.model.id}'s {f.model.num_heads} attention heads",
          allowed=lambda f: _divisors(f.model.num_heads)),
    _rule("tp", "gpus", "pp", broken=lambda f: f.ranks > f.config.gpus and f.config.tp > 1,
          message=lambda f: f"{{tp}} {f.config.tp} x {{pp}} {f.config.pp} needs {f.ranks} GPUs; {{gpus}} is "
                            f"{f.config.gpus}",
          allowed=lambda f: f"{{tp}} x {{pp}} dividing {{gpus}} {f.config.gpus}, or {{gpus}} {f.ranks}"),
    _rule("pp", "gpus", "tp", broken=lambda f: f.ranks > f.config.gpus,
          message=lambda f: f"{f.config.pp} stages need {f.ranks} GPUs; {{gpus}} is {f.config.gpus}",
          allowed=lambda f: f"{{pp}} dividing {{gpus}} {f.config.gpus}, or {{gpus}} {f.ranks}"),
    _rule("gpus", "tp", "pp", broken=lambda f: f.config.gpus % f.ranks != 0,
          message=lambda f: f"{f.config.gpus} is not a multiple of {{tp}} x {{pp}} = {f.ranks}",
          allowed=lambda f: f"multiples of {f.ranks}"),
    # The plan splits the key/value projections by whole heads, as every stack's does: Megatron-core divides its
    # query groups by tp (divide() asserts), torchtitan's attention views its Colwise shard as whole heads.
    _rule("tp", broken=lambda f: f.model.num_kv_heads % f.config.tp != 0,
          message=lambda f: f"{f.config.tp} does not divide {f.model.id}'s {f.model.num_kv_heads} key/value heads "
                            "(tensor parallelism splits them by whole heads)",
          allowed=lambda f: _divisors(math.gcd(f.model.num_heads, f.model.num_kv_heads))),
    _rule("tp", broken=lambda f: f.config.tp > 1 and f.model.intermediate_size % f.config.tp != 0,
          message=lambda f: f"{f.config.tp} does not divide " + ("the experts' " if f.model.is_moe else "")
                            + f"intermediate size {f.model.intermediate_size}",
          allowed=lambda f: _divisors(math.gcd(f.model.num_heads, f.model.num_kv_heads, f.model.intermediate_size))),
    # ---- parallel layouts no stack runs (issue 13): refused, where memtui would otherwise model a program nobody
    # can run (every layout it accepts is traced by `memtui trace`) -------------------------------------------
    _rule("quant", "tp", broken=lambda f: f.config.quant != "none" and f.config.tp > 1,
          message=lambda f: f"{f.config.quant} beside {{tp}} {f.config.tp}: no stack runs quantized weights under "
                            "tensor parallelism (NeMo Automodel's QLoRA recipes run tp_size 1)",
          allowed=lambda f: "none, or {tp} 1 (QLoRA shards over GPUs with {zero} 2 or 3)"),
    _rule("zero", "lora_rank", "tp",
          broken=lambda f: f.config.uses_lora and f.ddp_beside_tp,
          message=lambda f: f"{f.config.zero} runs DDP, and LoRA with DDP beside {{tp}} {f.config.tp} trains the frozen "
                            "base: PyTorch's _pre_dp_module_transform makes every parameter a new, trainable one",
          allowed=_FSDP2_OR_NO_TP),
    _rule("zero", "tp", "model",
          broken=lambda f: f.model.is_moe and f.ddp_beside_tp,
          message=lambda f: f"{f.config.zero} runs DDP, which torchtitan (the MoE plan's stack) refuses beside "
                            f"{{tp}} {f.config.tp} (\"DDP has not supported > 1D parallelism\")",
          allowed=_FSDP2_OR_NO_TP),
    _rule("zero", "tp", "model",
          broken=lambda f: f.model.tie_word_embeddings and f.config.pp == 1 and f.ddp_beside_tp,
          message=lambda f: f"{f.config.zero} runs DDP, which cannot run {f.model.id}'s tied embedding beside {{tp}} "
                            f"{f.config.tp}: PyTorch's _pre_dp_module_transform makes the tied weight local under one "
                            "name only, and DDP cannot bucket the other, a DTensor",
          allowed=_FSDP2_OR_NO_TP),
    _rule("quant", "zero", broken=lambda f: f.config.quant == "int8" and f.config.dp > 1 and f.config.zero >= 2,
          message=lambda f: f"int8 under {{zero}} {f.config.zero} (FSDP2): bitsandbytes' Int8Params keeps its row "
                            "scales on the parameter, which FSDP2's sharding drops",
          allowed=lambda f: "none, nf4 (bitsandbytes shards 4-bit weights), or int8 with {zero} 0 or 1"),
    _rule("offload", "tp", "pp", broken=lambda f: (f.config.tp > 1 or f.config.pp > 1) and f.config.deepspeed_offload,
          message=lambda f: f"{f.config.offload} here is DeepSpeed's ZeRO-Offload, which no stack runs beside "
                            "PyTorch's tensor or pipeline parallelism",
          allowed=lambda f: "none, or optimizer+params with {zero} 2 or 3 over data-parallel ranks (FSDP2's "
                            "CPUOffloadPolicy)"),
    _rule("pp", "model", broken=lambda f: f.config.pp > 1 and f.model.is_moe
          and bool(f.model.config.get("output_router_logits")),
          message=lambda f: f"{f.model.id}'s router load-balancing loss (output_router_logits) sums every layer's "
                            "router logits, across the stages: no stack runs it under pipeline parallelism",
          allowed=lambda f: "1, or a config.json with output_router_logits false"),
    _rule("optimizer_in_backward", "pp", broken=lambda f: f.config.optimizer_in_backward and f.config.pp > 1,
          message=lambda f: "steps each parameter when its gradient is made, but a pipeline schedule accumulates "
                            "every gradient over the micro-batches (no stack runs it under pipeline parallelism)",
          allowed=lambda f: "off, or {pp} 1"),
    _rule("loss", "pp", "zero",
          broken=lambda f: f.config.loss == "fused-linear" and f.config.pp > 1 and f.config.dp > 1
          and f.config.zero == 3,
          message=lambda f: "fused-linear reads the head's weight after the last stage's forward, which ZeRO-3 has "
                            "resharded by then",
          allowed=lambda f: "standard, chunked, or fused-linear with {zero} 0, 1 or 2"),
    _rule("loss_dtype", "pp", broken=lambda f: f.config.loss_dtype == "compute" and f.config.pp > 1,
          message=lambda f: "compute is LitGPT's chunked loss, and LitGPT has no pipeline parallelism",
          allowed=lambda f: "fp32, or {pp} 1"),
    _rule("pp", broken=lambda f: f.config.pp > f.model.num_layers,
          message=lambda f: f"{f.config.pp} stages for {f.model.num_layers} layers",
          allowed=lambda f: f"1..{f.model.num_layers}"),
    _rule("lora_targets", "lora_rank", broken=lambda f: f.config.uses_lora and not f.lora_targets and not f.head,
          message=lambda f: f"{f.model.id} has no linear layer LoRA can adapt"),
    _rule("lora_rank", "lora_targets", broken=lambda f: f.config.uses_lora and f.config.lora_rank > f.smallest_adapted,
          message=lambda f: f"{f.config.lora_rank} exceeds the smallest adapted dimension",
          allowed=lambda f: f"1..{f.smallest_adapted}"),
    _rule("optimizer", "lora_rank", broken=lambda f: f.config.uses_lora and f.config.optimizer == "galore-adamw",
          message=lambda f: "galore-adamw projects full-rank gradients; it does not combine with LoRA",
          allowed=lambda f: "adamw, adamw-8bit, sgd, sgd-momentum, adafactor, lion"),
    _rule("galore_rank", "optimizer",
          broken=lambda f: (f.config.optimizer == "galore-adamw"
                            and f.config.galore_rank > min(f.model.hidden_size, f.model.intermediate_size)),
          message=lambda f: f"{f.config.galore_rank} exceeds the hidden size",
          allowed=lambda f: f"1..{min(f.model.hidden_size, f.model.intermediate_size)}"),
    _rule("quant", "lora_rank", broken=lambda f: f.config.quant != "none" and not f.config.uses_lora,
          message=lambda f: f"{f.config.quant} freezes the base weights; set {{lora_rank}} to train adapters",
          allowed=lambda f: "none, or int8/nf4 with {lora_rank} > 0"),
    _rule("quant", "precision", broken=lambda f: f.config.quant != "none" and f.config.precision == "32-true",
          message=lambda f: "quantized bases compute in 16 bits",
          allowed=lambda f: "with {precision} 16-mixed, bf16-mixed, 16-true, bf16-true"),
    _rule("master_weights", "precision",
          broken=lambda f: f.config.master_weights and f.config.precision not in ("16-true", "bf16-true"),
          message=lambda f: f"needs 16-bit weights, not {{precision}} {f.config.precision}",
          allowed=lambda f: "{precision} 16-true, bf16-true"),
    _rule("offload", "zero", broken=lambda f: f.config.offload == "optimizer+params" and f.config.zero != 3,
          message=lambda f: "optimizer+params needs {zero} 3 (parameters must be sharded to be offloaded)",
          allowed=lambda f: "none, optimizer"),
    _rule("offload", "zero", broken=lambda f: f.config.offload != "none" and f.config.zero == 0,
          message=lambda f: "offloading runs through ZeRO; set {zero} 1, 2 or 3",
          allowed=lambda f: "none"),
    _rule("optimizer_in_backward", "grad_accum",
          broken=lambda f: f.config.optimizer_in_backward and f.config.grad_accum > 1,
          message=lambda f: "steps the optimizer in every backward, so gradients cannot accumulate across "
                            f"{{grad_accum}} {f.config.grad_accum} micro-batches",
          allowed=lambda f: "off, or {grad_accum} 1"),
    _rule("optimizer_in_backward", "zero",
          broken=lambda f: f.config.optimizer_in_backward and f.config.zero >= 1,
          message=lambda f: f"steps each whole parameter in its hook; {{zero}} {f.config.zero} shards the optimizer",
          allowed=lambda f: "off, or {zero} 0"),
    _rule("optimizer_in_backward", "precision", "master_weights", "optimizer",
          broken=lambda f: f.config.optimizer_in_backward and (
              f.config.precision == "16-mixed" or f.config.master_weights or f.config.optimizer == "galore-adamw"),
          message=lambda f: "one plain optimizer per parameter: no GradScaler (16-mixed), {master_weights} "
                            "wrapper or galore-adamw",
          allowed=lambda f: "off, or another {precision}/{optimizer} without {master_weights}"),
    _note("zero", "gpus", broken=lambda f: bool(f.config.zero) and f.ranks == f.config.gpus == 1,
          message=lambda f: "ZeRO shards across data-parallel ranks; with one GPU it changes nothing."),
    _note("optimizer_impl", "optimizer",
          broken=lambda f: f.config.optimizer_impl == "fused" and f.config.optimizer in UNFUSED_OPTIMIZERS,
          message=lambda f: f"{f.config.optimizer} has no fused kernel: it steps one tensor at a time (for-loop)."),
    _rule("seq_len", "model",
          broken=lambda f: f.model.positions == "learned" and f.config.seq_len > f.model.max_position_embeddings,
          message=lambda f: f"{f.model.id} has {f.model.max_position_embeddings} learned positions",
          allowed=lambda f: f"1..{f.model.max_position_embeddings}"),
    _note("seq_len", "model", broken=lambda f: f.config.seq_len > f.model.max_position_embeddings,
          message=lambda f: f"seq-len {f.config.seq_len} is beyond {f.model.id}'s "
                            f"{f.model.max_position_embeddings} trained positions."),
    _note("precision", "gpu", broken=lambda f: "bf16" in f.config.precision and not f.gpu.bf16,
          message=lambda f: f"{f.gpu.name} has no bf16 support; use 16-mixed or 16-true there."),
    _note("attention", "tp", broken=lambda f: f.config.tp > 1 and f.config.attention == "eager",
          message=lambda f: "eager attention under tensor parallelism keeps s x s scores per head shard."),
    _note("model", broken=lambda f: bool(f.model.notes), message=lambda f: " ".join(f.model.notes)),
    _note("model", broken=lambda f: f.model.is_moe,
          message=lambda f: "MoE: transformers' grouped_mm experts process tokens x top-k rows whatever the routing, "
                            "so the step's memory does not depend on which experts the router picks."),
    _note("attention", "model", broken=lambda f: f.model.family in EAGER_ONLY_FAMILIES and f.config.attention == "flash",
          message=lambda f: f"{f.model.id}: transformers has no SDPA path for gpt-oss's attention sinks, so the step "
                            "runs eager attention (s x s scores per head), as transformers picks by default."),
    _rule("checkpointing", "model",
          broken=lambda f: f.model.family == "gpt_oss" and f.config.checkpointing == "selective",
          message=lambda f: "selective checkpointing saves the experts' grouped_mm outputs, which gpt-oss adds its "
                            "expert biases to in place (PyTorch refuses the step)",
          allowed=lambda f: "none, full"),
    _rule("loss", "gpus", "pp", "tp", broken=lambda f: f.config.loss != "standard" and f.config.gpus > 1
          and (f.config.pp == 1 or f.config.tp > 1),
          message=lambda f: f"{f.config.loss} is modelled on one GPU and under pipeline parallelism without tensor "
                            f"parallelism; {{gpus}} is {f.config.gpus}, {{pp}} {f.config.pp}, {{tp}} {f.config.tp}",
          allowed=lambda f: "standard, or {gpus} 1, or {pp} above 1 with {tp} 1"),
    # --modeling litgpt: LitGPT's GPT (litgpt/model.py, litgpt/lora.py) is modelled for its Llama-shaped configs,
    # as its LoRA fine-tune runs them on one GPU (finetune/lora.py: bf16-true, the chunked head and loss).
    _rule("modeling", "model", broken=lambda f: f.config.modeling == "litgpt" and f.model.family not in LITGPT_FAMILIES,
          message=lambda f: f"litgpt models LitGPT's GPT for {', '.join(LITGPT_FAMILIES)}; {f.model.id} is "
                            f"{f.model.family}",
          allowed=lambda f: "hf, or litgpt with a " + "/".join(LITGPT_FAMILIES) + " model"),
    _rule("modeling", "model", broken=lambda f: f.config.modeling == "litgpt" and (
              f.model.config.get("rope_scaling") or {}).get("type", (f.model.config.get("rope_scaling") or {}).get(
              "rope_type")) in ("longrope", "su"),
          message=lambda f: f"litgpt is modelled without LongRoPE; {f.model.id} has it",
          allowed=lambda f: "hf, or litgpt with a model without LongRoPE"),
    _rule("modeling", "gpus", "tp", "pp", "zero", "quant", "compile", "checkpointing", "activation_offload",
          "optimizer_in_backward",
          broken=lambda f: f.config.modeling == "litgpt" and (
              f.config.gpus > 1 or f.config.quant != "none" or f.config.compile or f.config.checkpointing != "none"
              or f.config.activation_offload or f.config.optimizer_in_backward),
          message=lambda f: "litgpt is modelled on one GPU, unquantized, without --compile, checkpointing, "
                            "activation offload or an optimizer in backward",
          allowed=lambda f: "hf, or litgpt with {gpus} 1, {quant} none, {checkpointing} none and the others off"),
    _rule("modeling", "precision", "attention", broken=lambda f: f.config.modeling == "litgpt" and (
              f.config.precision not in ("bf16-true", "16-true") or f.config.attention != "flash"),
          message=lambda f: f"litgpt is modelled with 16-bit weights and SDPA (LitGPT's fine-tunes); {{precision}} "
                            f"is {f.config.precision}, {{attention}} {f.config.attention}",
          allowed=lambda f: "hf, or litgpt with {precision} bf16-true or 16-true and {attention} flash"),
    _rule("modeling", "loss", "loss_dtype", broken=lambda f: f.config.modeling == "litgpt" and not (
              f.config.loss == "chunked" and f.config.loss_dtype == "compute"),
          message=lambda f: "litgpt is modelled with LitGPT's chunked head and chunked_cross_entropy "
                            "(finetune/lora.py); full.py's unchunked head is not modelled yet",
          allowed=lambda f: "hf, or litgpt with {loss} chunked and {loss_dtype} compute"),
    # litgpt/model.py's GPT keeps lm_head and wte as two weights (its Llama 3.2 configs set no tie_embeddings).
    _rule("modeling", "model", broken=lambda f: f.config.modeling == "litgpt" and f.model.tie_word_embeddings,
          message=lambda f: f"LitGPT's GPT ties no head to the embedding; {f.model.id} ties them",
          allowed=lambda f: "hf, or litgpt with a config.json whose tie_word_embeddings is false"),
    # litgpt/lora.py's Config has one lora_mlp switch for fc_1, fc_2 and proj together.
    _rule("modeling", "lora_targets", broken=lambda f: f.config.modeling == "litgpt" and f.config.uses_lora
          and len(set(litgpt_targets(f.lora_targets)) & set(LITGPT_MLP)) not in (0, len(LITGPT_MLP)),
          message=lambda f: "LitGPT adapts its MLP's three linears together (lora_mlp); {lora_targets} names "
                            "some of " + ", ".join(LITGPT_MLP),
          allowed=lambda f: "hf, or litgpt with all or none of " + ", ".join(LITGPT_MLP)),
    # LitGPT is the stack whose loss stays in the logits' dtype, and only behind its chunked head.
    _rule("loss_dtype", "loss", broken=lambda f: f.config.loss_dtype == "compute" and f.config.loss != "chunked",
          message=lambda f: f"compute is modelled with {{loss}} chunked (LitGPT's chunked head); {{loss}} is "
                            f"{f.config.loss}",
          allowed=lambda f: "fp32, or compute with {loss} chunked"),
    # torchtune's model upcasts only its whole output: its chunked output stays in the compute dtype
    # (torchtune/modules/transformer.py: chunked_output vs self.output(h).float()).
    _rule("logits_upcast", "loss", broken=lambda f: f.config.logits_upcast == "model" and f.config.loss != "standard",
          message=lambda f: f"model upcasts the standard loss's logits; {{loss}} is {f.config.loss}",
          allowed=lambda f: "loss, or model with {loss} standard"),
    # Whichever family: a config with final_logit_softcapping caps the logits, which neither kernel does.
    # LitGPT's chunked head returns its chunks before capping (litgpt/lora.py GPT.forward), so it caps nothing.
    _rule("loss", "model", broken=lambda f: f.config.loss != "standard" and f.model.final_logit_softcapping is not None
          and not (f.config.loss == "chunked" and f.config.loss_dtype == "compute"),
          message=lambda f: f"{f.config.loss} does not soft-cap the logits as {f.model.id} needs",
          allowed=lambda f: "standard, or chunked with {loss_dtype} compute (LitGPT's head, which caps nothing)"),
    # torchtitan's op-level policy, modelled on dense layers without tensor parallelism: an MoE layer's router and
    # grouped expert matmuls, and sequence parallelism's reduce-scatters, have their own rules there.
    _rule("checkpointing", "model", broken=lambda f: f.config.checkpointing == "selective-op" and f.model.is_moe,
          message=lambda f: f"selective-op is modelled for dense models; {f.model.id} has experts",
          allowed=lambda f: "none, selective, full"),
    _rule("checkpointing", "tp", broken=lambda f: f.config.checkpointing == "selective-op" and f.config.tp > 1,
          message=lambda f: "selective-op is modelled without tensor parallelism (torchtitan also saves its "
                            f"reduce-scatter outputs); {{tp}} is {f.config.tp}",
          allowed=lambda f: "none, selective, full, or {tp} 1"),
    # 16-mixed's GradScaler refuses fp16 gradients ("Attempting to unscale FP16 gradients"), as HF's Trainer does.
    _rule("lora_dtype", "precision", broken=lambda f: f.config.uses_lora and f.config.precision == "16-mixed"
          and f.config.adapter_dtype == "fp16",
          message=lambda f: "compute makes a quantized base's adapters fp16, and the GradScaler of {precision} "
                            "16-mixed refuses to unscale fp16 gradients",
          allowed=lambda f: "fp32, or {precision} bf16-mixed"),
    _rule("kbit_prep", "quant", broken=lambda f: f.config.kbit_prep and f.config.quant == "none",
          message=lambda f: "prepares a quantized (k-bit) base for training; {quant} is none",
          allowed=lambda f: "off, or on with {quant} nf4, int8"),
    _note("quant", "model", broken=lambda f: f.model.is_moe and f.config.quant != "none",
          message=lambda f: f"{f.config.quant}: bitsandbytes quantizes nn.Linear layers only; the experts' stacked "
                            "weights stay 16-bit (as transformers loads them)."),
    # ---- paged optimizers (bitsandbytes: states in CUDA unified memory) ------------------------------------
    _rule("optimizer", "gpus", broken=lambda f: f.config.optimizer in PAGED_OPTIMIZERS and f.config.gpus > 1,
          message=lambda f: f"{f.config.optimizer} is modelled on one GPU; {{gpus}} is {f.config.gpus}",
          allowed=lambda f: "adamw, adamw-8bit, or {gpus} 1"),
    _rule("optimizer", "offload", "master_weights", "optimizer_in_backward",
          broken=lambda f: f.config.optimizer in PAGED_OPTIMIZERS and (
              f.config.offload != "none" or f.config.master_weights or f.config.optimizer_in_backward),
          message=lambda f: f"{f.config.optimizer} keeps its own states in unified memory: no {{offload}}, "
                            "{master_weights} wrapper or {optimizer_in_backward}",
          allowed=lambda f: "adamw, adamw-8bit, or {offload} none without {master_weights} and "
                            "{optimizer_in_backward}"),
    # ---- activation offloading (torchtune OffloadActivations) -----------------------------------------------
    _rule("activation_offload", "gpus", broken=lambda f: f.config.activation_offload and f.config.gpus > 1,
          message=lambda f: f"is modelled on one GPU; {{gpus}} is {f.config.gpus}",
          allowed=lambda f: "off, or {gpus} 1"),
    # ---- LoRA on the output head; bitsandbytes before 0.43.2 (issue 11) -------------------------------------
    _rule("lora_targets", "loss", broken=lambda f: f.head and f.config.loss == "fused-linear",
          message=lambda f: "fused-linear takes the head's weight alone: an adapter on lm_head cannot be fused in",
          allowed=lambda f: "{lora_targets} without lm_head, or {loss} standard, chunked"),
    _rule("lora_targets", "gpus", broken=lambda f: f.head and f.config.gpus > 1,
          message=lambda f: f"LoRA on lm_head is modelled on one GPU; {{gpus}} is {f.config.gpus}",
          allowed=lambda f: "{lora_targets} without lm_head, or {gpus} 1"),
    _rule("lora_targets", "kbit_prep", "lora_dtype",
          broken=lambda f: f.head and f.config.kbit_prep and f.config.lora_dtype == "compute",
          message=lambda f: "after {kbit_prep} lm_head is fp32, so its compute-dtype adapter would be fp32 beside "
                            "16-bit ones: not modelled",
          allowed=lambda f: "{lora_targets} without lm_head, {kbit_prep} off, or {lora_dtype} fp32"),
    _rule("bnb_version", "quant", broken=lambda f: f.config.bnb_version == "legacy" and f.config.quant == "int8",
          message=lambda f: "legacy is bitsandbytes' 4-bit matmul before 0.43.2; its int8 path is not modelled",
          allowed=lambda f: "current, or legacy with {quant} nf4"),
    _rule("bnb_version", "gpus", broken=lambda f: f.config.bnb_version == "legacy" and f.config.quant == "nf4"
          and f.config.gpus > 1,
          message=lambda f: f"legacy is modelled on one GPU; {{gpus}} is {f.config.gpus}",
          allowed=lambda f: "current, or {gpus} 1"),
    _note("bnb_version", "quant", broken=lambda f: f.config.bnb_version == "legacy" and f.config.quant == "none",
          message=lambda f: "bitsandbytes before 0.43.2 differs only in its 4-bit (nf4) layers; without them the "
                            "version changes nothing."),
    # ---- torch.compile per decoder layer (issue 11) ----
    _note("compile", broken=lambda f: f.config.compile,
          message=lambda f: "torch.compile: `memtui trace` runs each decoder layer"
                            + (" (the loss stays eager: --eager-loss)" if f.config.eager_loss else
                               " and the loss (Liger's fused kernel and LitGPT's chunked loss stay eager)"
                               if f.config.loss == "fused-linear" or f.config.loss_dtype == "compute" else
                               " and the loss")
                            + " through AOTAutograd and inductor's partitioner (on one GPU, or FSDP2 with "
                            "--checkpointing selective-op, without --quant or --checkpointing selective"
                            + ("; selective-op's policy is traced into each layer's graph, as torchtitan compiles its "
                               "checkpoint-wrapped blocks" if f.config.checkpointing == "selective-op" else "")
                            + "); "
                            + ("the estimate puts each layer's and the loss's ops through the same min-cut and "
                               "fusion rules"
                               if not unmodelled_compile(f.config, f.model) else
                               f"the estimate does not model it for {unmodelled_compile(f.config, f.model)}: its "
                               "figures are eager PyTorch's, an upper bound")),
    # ---- hybrid sharding (issue 13) ----
    # FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), as torchtitan applies it: traced and
    # estimated for a full bf16-mixed fine-tune sharded by FSDP2 alone. Elsewhere it changes nothing, said once.
    _note("fsdp_param_dtype", "precision",
          broken=lambda f: f.config.fsdp_param_dtype == "compute" and not f.config.fsdp_casts,
          message=lambda f: "--fsdp-param-dtype compute is modelled for a full bf16-mixed fine-tune sharded by FSDP2 "
                            "(--zero 2/3 over several data-parallel ranks, no LoRA, quantized base, offload, --tp or "
                            "--pp); here the parameters are gathered as stored."),
    _rule("shard_group", "zero", broken=lambda f: f.config.shard_group > 0 and f.config.zero < 2,
          message=lambda f: f"HSDP shards through FSDP2; {{zero}} {f.config.zero} does not shard parameters or "
                            "gradients",
          allowed=lambda f: "0, or a group size with {zero} 2 or 3"),
    _rule("shard_group", "gpus", "tp", "pp",
          broken=lambda f: f.config.shard_group > 0 and (f.config.shard_group < 2
                                                          or f.config.dp % f.config.shard_group != 0),
          message=lambda f: f"{f.config.shard_group} does not split the {f.config.dp} data-parallel ranks into "
                            "shard groups of 2 or more",
          allowed=lambda f: "0, " + ", ".join(str(d) for d in range(2, f.config.dp + 1) if f.config.dp % d == 0)
          if f.config.dp > 1 else "0 (one data-parallel rank)"),
    # ---- float8 linears (issue 11): torchao's Float8Linear over a full bf16 fine-tune, one GPU or FSDP/DDP ----
    _rule("float8", "lora_rank", "quant",
          broken=lambda f: f.config.float8 != "off" and (f.config.uses_lora or f.config.quant != "none"),
          message=lambda f: "float8 converts the trained nn.Linear layers of a full fine-tune; LoRA and quantized "
                            "bases are not converted",
          allowed=lambda f: "off, or tensorwise with {lora_rank} 0 and {quant} none"),
    _rule("float8", "precision", broken=lambda f: f.config.float8 != "off" and "bf16" not in f.config.precision,
          message=lambda f: f"float8 training is modelled in bf16 (torchtitan's); {{precision}} is "
                            f"{f.config.precision}",
          allowed=lambda f: "off, or tensorwise with {precision} bf16-mixed or bf16-true"),
    _rule("float8", "tp", "pp", broken=lambda f: f.config.float8 != "off" and (f.config.tp > 1 or f.config.pp > 1),
          message=lambda f: "float8 is modelled with data parallelism (FSDP2, DDP) alone; torchao's float8 tensor "
                            "parallel plan and pipeline stages are not",
          allowed=lambda f: "off, or tensorwise with {tp} 1 and {pp} 1"),
    _rule("float8", "model", broken=lambda f: f.config.float8 != "off" and (
              f.model.is_moe or f.model.family in ("gpt2", "generic")),
          message=lambda f: f"float8 converts nn.Linear layers of a dense model; {f.model.id} is "
                            + ("a mixture of experts" if f.model.is_moe else f"{f.model.family} (no nn.Linear layers)"
                               if f.model.family == "gpt2" else "a generic (traced) model"),
          allowed=lambda f: "off"),
    _rule("float8", "offload", broken=lambda f: f.config.float8 != "off" and (
              f.config.offload != "none" or f.config.activation_offload),
          message=lambda f: "float8 is not modelled with CPU offloading",
          allowed=lambda f: "off, or tensorwise with {offload} none and no activation offload"),
    # ---- pipeline schedules (issue 13): what torch.distributed.pipelining's schedules accept ----
    _rule("microbatches", "batch_size", "pp",
          broken=lambda f: f.config.pp > 1 and f.config.batch_size % f.config.microbatches != 0,
          message=lambda f: f"{f.config.microbatches} does not divide {{batch_size}} {f.config.batch_size} into "
                            "equal micro-batches",
          allowed=lambda f: ", ".join(str(d) for d in range(1, f.config.batch_size + 1) if f.config.batch_size % d == 0)),
    _rule("microbatches", "pp", "pp_schedule",
          broken=lambda f: f.config.pp > 1 and f.config.pp_schedule == "1f1b" and f.config.microbatches < f.config.pp,
          message=lambda f: f"1F1B needs at least one micro-batch per stage (torch's Schedule1F1B); {{pp}} is "
                            f"{f.config.pp}, {{microbatches}} is {f.config.microbatches}",
          allowed=lambda f: f"{{microbatches}} {f.config.pp} or more (dividing {{batch_size}}), or {{pp_schedule}} gpipe"),
    _rule("microbatches", "pp", "pp_schedule",
          broken=lambda f: (f.config.pp > 1 and f.config.pp_schedule == "interleaved-1f1b"
                            and f.config.microbatches % f.config.pp != 0),
          message=lambda f: f"interleaved 1F1B runs the micro-batches in rounds of {{pp}} {f.config.pp}; "
                            f"{{microbatches}} is {f.config.microbatches}",
          allowed=lambda f: f"multiples of {f.config.pp} (dividing {{batch_size}}), or {{pp_schedule}} gpipe or 1f1b"),
    _rule("pp_schedule", "pp", broken=lambda f: (f.config.pp > 1 and f.config.pp_schedule == "interleaved-1f1b"
                                                  and 2 * f.config.pp > f.model.num_layers),
          message=lambda f: f"interleaved 1F1B puts two stages on each rank: {2 * f.config.pp} stages for "
                            f"{f.model.num_layers} layers",
          allowed=lambda f: f"{{pp}} up to {f.model.num_layers // 2}, or {{pp_schedule}} gpipe or 1f1b"),
    _note("microbatches", "pp", broken=lambda f: f.config.pp == 1 and f.config.microbatches > 1,
          message=lambda f: "--microbatches splits the batch between pipeline stages; without --pp it changes nothing"),
)


# What a shape is: a rule that names neither field judges every batch size and sequence length of an option set alike.
SHAPE_FIELDS = frozenset(("batch_size", "seq_len"))

Checks = tuple[tuple[Rule, bool], ...]  # check_config's rules in order, each with whether it is known to be broken


def checks_at_a_shape(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec) -> Checks:
    """The rules check_config asks at each shape of config's option set (every option but the batch size and the
    sequence length; the model and the GPU), in order: each that names a shape field, to ask there; each other one
    only where it is broken here (its message is still written at the shape), up to the first that refuses or
    raises here, as it will at every shape."""
    facts = Facts(config, model, gpu)
    checks: list[tuple[Rule, bool]] = []
    for rule in RULES:
        if SHAPE_FIELDS.intersection(rule.fields):
            checks.append((rule, False))
            continue
        try:
            broken = rule.broken(facts)
        except InputError:  # judging it refused (resolve_lora_targets): asked at the shape, it refuses there too
            checks.append((rule, False))
            break
        if broken:
            checks.append((rule, True))
            if rule.refuse:
                break
    return tuple(checks)


def check_config(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, checks: Checks | None = None) -> list[str]:
    """Raise InputError for the first impossible combination; return notes for questionable ones. `checks`:
    checks_at_a_shape of config's option set, where the caller keeps it (the same answer, fewer rules asked)."""
    facts = Facts(config, model, gpu)
    notes: list[str] = []
    for rule, known in checks if checks is not None else ((rule, False) for rule in RULES):
        if not known and not rule.broken(facts):
            continue
        if not rule.refuse:
            notes.append(rule.message(facts))
            continue
        allowed = rule.allowed(facts) if rule.allowed is not None else None
        raise InputError(rule.fields[0], rule.message(facts), allowed, fields=rule.fields)
    return notes
