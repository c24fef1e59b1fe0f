"""Every training option, declared once: one entry per TrainingConfig field.

Each front end derives what it shows from here: the CLI its flags, types and
help (cli/options.py), the planner its inputs, groups, bounds and labels
(tui/option_specs.py), the explainer list its order, the savings ladder its
row labels, and README's "Flags" table its rows (`flag_table_rows`, checked by
tests/test_option_registry.py). Value types, defaults and bounds stay where
pydantic checks them (TrainingConfig in specs.py) and are read from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from memtui.engine.errors import InputError, cli_flag
from memtui.engine.model.specs import TrainingConfig

Kind = Literal["select", "int", "float", "switch", "text", "model", "gpu"]

MODEL_AND_HARDWARE = "Model & hardware"
WORKLOAD = "Workload"
PRECISION_AND_OPTIMIZER = "Precision & optimizer"
MEMORY_SAVERS = "Memory savers"
PARALLELISM = "Parallelism"
ADAPTERS = "Adapters & quantization"


@dataclass(frozen=True)
class Option:
    """One TrainingConfig field as every front end presents it."""

    field: str
    label: str  # the planner's name for it
    group: str
    kind: Kind
    help: str  # one line: CLI --help and README
    example: str  # README's example column
    explainer: str = ""  # key of the long text in tui/explain.py; defaults to the field
    # The savings ladder's row label: a template formatted with the config's fields (and `dp`), or one per
    # value (keyed by the value as text). Empty: not a rung of its own.
    ladder: str | Mapping[str, str] = ""
    baseline: Any = None  # its value in the ladder's unoptimized baseline; None: the ladder keeps it

    # ---- derived from TrainingConfig -----------------------------------------------
    @property
    def flag(self) -> str:
        return cli_flag(self.field)

    @property
    def explainer_key(self) -> str:
        return self.explainer or self.field

    @property
    def default(self) -> Any:
        return TrainingConfig.model_fields[self.field].default

    def _bound(self, name: str) -> int | float | None:
        metadata = TrainingConfig.model_fields[self.field].metadata
        return next((getattr(item, name) for item in metadata if getattr(item, name, None) is not None), None)

    @property
    def minimum(self) -> int | float | None:
        return self._bound("ge")

    @property
    def maximum(self) -> int | float | None:
        return self._bound("le")

    @property
    def below(self) -> float | None:
        """An exclusive upper bound (a float's `lt`)."""
        return self._bound("lt")

    @property
    def is_int(self) -> bool:
        return TrainingConfig.model_fields[self.field].annotation is int

    @property
    def choices(self) -> tuple[str, ...]:
        """A picker's values as text: the Literal's, or every whole number between the bounds."""
        if self.kind != "select":
            return ()
        if self.is_int:
            return tuple(str(value) for value in range(self.minimum or 0, (self.maximum or 0) + 1))
        return tuple(get_args(TrainingConfig.model_fields[self.field].annotation))

    def from_text(self, text: str) -> Any:
        """A picker's or the command line's text as the field's type."""
        if self.kind == "float":
            return float(text)
        return int(text) if self.is_int else text

    # ---- checks -------------------------------------------------------------------
    def bounds_text(self) -> str:
        low, high = self.minimum, self.maximum
        if self.kind == "float":
            return f"{low:g} <= P < {self.below:g}" if self.below is not None else f"{low:g}..{high:g}"
        if high is None:
            return f"whole numbers from {low}"
        return f"{low}..{high:,}"

    def parse_number(self, text: str) -> int | float:
        """A number typed for this option (whole, or decimal for a float), within its bounds, or an InputError
        naming the field. The planner's inputs and the command line both check with it."""
        text = text.strip()
        kind, noun = (float, "number") if self.kind == "float" else (int, "whole number")
        try:
            value = kind(text)
        except ValueError:
            message = "is empty" if not text else f"{text!r} is not a {noun}"
            raise InputError(self.field, message, self.bounds_text()) from None
        low, high, below = self.minimum, self.maximum, self.below
        if self.kind == "float":
            if not ((low is None or value >= low) and (high is None or value <= high)
                    and (below is None or value < below)):  # NaN fails every comparison
                raise InputError(self.field, f"must be {self.bounds_text()}, got {text}")
            return value
        if low is not None and value < low:
            raise InputError(self.field, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise InputError(self.field, f"must be at most {high:,}, got {value:,}")
        return value

    def ladder_label(self, config: TrainingConfig) -> str:
        """This option's row label in the savings ladder, for `config`'s value."""
        template = self.ladder
        if isinstance(template, Mapping):
            template = template.get(str(getattr(config, self.field)), "")
        return template.format(**config.model_dump(), dp=config.dp)

    # ---- README ---------------------------------------------------------------------
    def values_text(self) -> str:
        """README's "values (default)" cell."""
        if self.kind == "select":
            values = ", ".join(f"`{choice}`" for choice in self.choices)
            return f"{self.help}: {values} (`{self.default}`)"
        if self.kind == "switch":
            return f"{self.help} ({'on' if self.default else 'off'})"
        if self.kind in ("int", "float"):
            return f"{self.help}, {self.bounds_text()} (`{self.default}`)"
        return f"{self.help} (`{self.default}`)"

    def table_row(self) -> str:
        return f"| `{self.flag}` | {self.values_text()} | `{self.example}` |"


_OPTIONS = (
    # ---- model & hardware -----------------------------------------------------------------
    Option("model", "Model", MODEL_AND_HARDWARE, "model",
           "a preset id, a path to a config.json, or a Hugging Face Hub id org/name (its config.json from the "
           "local Hub cache, else downloaded alone)", "--model ./my-model/config.json"),
    Option("gpu", "GPU", MODEL_AND_HARDWARE, "gpu", "a GPU preset id", "--gpu rtx-4090"),
    Option("gpus", "GPU count", MODEL_AND_HARDWARE, "int",
           "total GPUs; data-parallel ranks = gpus / (tp x pp)", "--gpus 8"),
    # ---- workload -----------------------------------------------------------------------------
    Option("batch_size", "Batch size", WORKLOAD, "int", "micro-batch per data-parallel rank", "--batch-size 8"),
    Option("seq_len", "Seq length", WORKLOAD, "int",
           "tokens per sequence (at most the model's limit for learned positions)", "--seq-len 8192"),
    # ---- precision & optimizer ------------------------------------------------------------------
    Option("precision", "Precision", PRECISION_AND_OPTIMIZER, "select",
           "number format of weights and math", "--precision bf16-true",
           ladder={"16-mixed": "fp16 mixed precision (autocast)", "bf16-mixed": "bf16 mixed precision (autocast)",
                   "16-true": "fp16 weights and gradients", "bf16-true": "bf16 weights and gradients"},
           baseline="32-true"),
    Option("master_weights", "Master fp32", PRECISION_AND_OPTIMIZER, "switch",
           "fp32 master copy in the optimizer, with 16-true/bf16-true", "--precision bf16-true --master-weights",
           ladder="fp32 master copy", baseline=False),
    Option("optimizer", "Optimizer", PRECISION_AND_OPTIMIZER, "select",
           "the optimizer", "--optimizer adamw-8bit",
           ladder={"adamw-8bit": "8-bit AdamW states", "sgd": "plain SGD (no optimizer state)",
                   "sgd-momentum": "SGD with momentum (one state)", "adafactor": "Adafactor (factored states)",
                   "lion": "Lion (one state)", "galore-adamw": "GaLore AdamW (rank {galore_rank})",
                   "paged-adamw-8bit": "paged 8-bit AdamW states (unified memory)",
                   "paged-adamw": "paged 32-bit AdamW states (unified memory)"},
           baseline="adamw"),
    Option("optimizer_impl", "Opt. impl", PRECISION_AND_OPTIMIZER, "select",
           "how the optimizer steps", "--optimizer-impl fused",
           ladder={"fused": "fused optimizer step", "for-loop": "for-loop optimizer step"}, baseline="foreach"),
    Option("galore_rank", "GaLore rank", PRECISION_AND_OPTIMIZER, "int",
           "GaLore projection rank", "--optimizer galore-adamw --galore-rank 256"),
    # ---- memory savers ----------------------------------------------------------------------------
    Option("checkpointing", "Checkpoint", MEMORY_SAVERS, "select",
           "activation checkpointing", "--checkpointing full",
           ladder={"selective": "selective checkpointing", "selective-op": "torchtitan's op-level selective checkpointing",
                   "full": "full activation checkpointing"},
           baseline="none"),
    Option("attention", "Attention", MEMORY_SAVERS, "select",
           "eager (s x s scores) or flash (SDPA)", "--attention eager",
           ladder={"flash": "flash attention"}, baseline="eager"),
    Option("offload", "CPU offload", MEMORY_SAVERS, "select",
           "move optimizer states (and weights) to the CPU, through ZeRO", "--zero 3 --offload optimizer+params",
           ladder={"optimizer": "optimizer offloaded to CPU",
                   "optimizer+params": "optimizer and weights offloaded to CPU"},
           baseline="none"),
    # ---- parallelism ---------------------------------------------------------------------------------
    Option("zero", "ZeRO stage", PARALLELISM, "select",
           "ZeRO stage; 3 = FSDP", "--zero 3 --gpus 8",
           ladder={"1": "ZeRO-1: optimizer states sharded", "2": "ZeRO-2: + gradients sharded",
                   "3": "ZeRO-3 / FSDP: + weights sharded"},
           baseline=0),
    Option("tp", "Tensor par.", PARALLELISM, "int",
           "tensor-parallel ranks, with sequence parallel", "--tp 8 --gpus 64",
           ladder="tensor parallel x{tp}", baseline=1),
    Option("pp", "Pipe. par.", PARALLELISM, "int",
           "pipeline stages (torch.distributed.pipelining), one rank each", "--pp 4 --gpus 8 --microbatches 4 --batch-size 4",
           ladder="pipeline parallel, {pp} stages", baseline=1),
    # ---- adapters & quantization -----------------------------------------------------------------------
    Option("lora_rank", "LoRA rank", ADAPTERS, "int",
           "LoRA rank; 0 trains every weight", "--lora-rank 16",
           ladder="LoRA rank {lora_rank} ({lora_targets})", baseline=0),
    Option("lora_targets", "LoRA layers", ADAPTERS, "text",
           "comma list of linear layers or all-linear; lm_head adapts the output head too",
           "--lora-targets all-linear,lm_head"),
    Option("quant", "Quantize", ADAPTERS, "select",
           "frozen base weights (nf4 + LoRA = QLoRA)", "--quant nf4 --lora-rank 16",
           ladder={"nf4": "NF4 4-bit base weights (QLoRA)", "int8": "int8 base weights"}, baseline="none"),
    # ---- the head and loss (issue 11) ------------------------------------------------------------------
    Option("loss", "Loss", MEMORY_SAVERS, "select",
           "standard (fp32 logits), chunked (torchtune) or fused-linear (Liger: no logits)", "--loss fused-linear",
           ladder={"chunked": "chunked head and loss ({loss_chunks} chunks)",
                   "fused-linear": "fused linear cross-entropy (no logits)"},
           baseline="standard"),
    Option("loss_chunks", "Loss chunks", MEMORY_SAVERS, "int",
           "sequence chunks of --loss chunked", "--loss chunked --loss-chunks 16", explainer="loss"),
    Option("loss_dtype", "Loss dtype", MEMORY_SAVERS, "select",
           "the chunked loss's log-probabilities upcast to fp32 (torchtune) or in the logits' dtype (LitGPT's "
           "chunked_cross_entropy)", "--loss chunked --loss-dtype compute",
           ladder={"compute": "loss in the compute dtype (no fp32 upcast)"}, baseline="fp32"),
    Option("logits_upcast", "Logits upcast", MEMORY_SAVERS, "select",
           "where the standard loss's logits become fp32: in the loss (transformers) or in the model, which "
           "returns fp32 logits (torchtune)", "--logits-upcast model"),
    # ---- gradients across micro-batches and the optimizer step ------------------------------------------
    Option("grad_accum", "Grad accum", WORKLOAD, "int",
           "micro-batches per optimizer step; from the second on a full set of gradients is alive",
           "--grad-accum 8"),
    Option("optimizer_in_backward", "Opt. in bwd", MEMORY_SAVERS, "switch",
           "step each parameter in backward and free its gradient (torchtune optimizer_in_bwd)",
           "--optimizer-in-backward", ladder="optimizer step in backward", baseline=False),
    # ---- how peft builds the adapters (issue 11) -----------------------------------------------------------
    Option("lora_dropout", "LoRA dropout", ADAPTERS, "float",
           "dropout probability on each adapter's input (peft keeps its output and mask for backward)",
           "--lora-dropout 0.05"),
    Option("lora_dtype", "LoRA dtype", ADAPTERS, "select",
           "adapters in fp32 (peft's default: each adapted layer's input is cast to fp32) or in the model's dtype",
           "--lora-dtype compute", ladder={"compute": "LoRA adapters in the model's dtype"}, baseline="fp32"),
    Option("kbit_prep", "k-bit prep", ADAPTERS, "switch",
           "peft's prepare_model_for_kbit_training: every unquantized weight in fp32, with --quant",
           "--quant nf4 --kbit-prep", ladder="k-bit prep (fp32 norms, embeddings, head)", baseline=False),
    Option("bnb_version", "bnb release", ADAPTERS, "select",
           "bitsandbytes' 4-bit matmul: current (0.43.2 on) keeps only the quantized weight for backward; legacy "
           "(before 0.43.2) also keeps its input until backward ends", "--quant nf4 --bnb-version legacy"),
    # ---- saved activations in host memory (issue 11) -------------------------------------------------------------
    Option("activation_offload", "Act. offload", MEMORY_SAVERS, "switch",
           "saved activations to pinned CPU memory in forward, back in backward (torchtune OffloadActivations)",
           "--checkpointing full --activation-offload", ladder="activations offloaded to CPU", baseline=False),
    # ---- torch.compile (issue 11) -----------------------------------------------------------------------
    Option("compile", "Compile", MEMORY_SAVERS, "switch",
           "torch.compile each decoder layer and the loss (torchtune, torchtitan): the min-cut partitioner decides "
           "what is saved, fused pointwise ops keep no buffers", "--compile",
           ladder="torch.compile (the partitioner's saved tensors)", baseline=False),
    Option("eager_loss", "Eager loss", MEMORY_SAVERS, "switch",
           "with --compile, the layers alone compiled and the loss eager (torchtitan without \"loss\" in "
           "compile.components, torchtune's full-finetune recipes with a whole-module loss)", "--compile --eager-loss"),
    # ---- hybrid sharding (issue 13) -------------------------------------------------------------------
    Option("shard_group", "Shard group", PARALLELISM, "int",
           "HSDP: shard within groups of G data-parallel ranks, replicate across them; 0 shards over all",
           "--zero 3 --gpus 16 --shard-group 8", explainer="zero"),
    # ---- the training stack's defaults (issue 11) -------------------------------------------------------
    Option("stack", "Stack", MODEL_AND_HARDWARE, "select",
           "set the options to a training framework's defaults (docs/stacks.md); options given override them",
           "--stack litgpt"),
    # ---- pipeline schedules (issue 13) -------------------------------------------------------------------
    Option("pp_schedule", "PP schedule", PARALLELISM, "select",
           "the pipeline schedule: all forwards then all backwards, one-forward-one-backward, or 1F1B over two "
           "virtual stages per rank", "--pp 4 --pp-schedule gpipe", explainer="pp"),
    Option("microbatches", "Micro-batches", PARALLELISM, "int",
           "pipeline micro-batches the batch is split into (each of batch / microbatches sequences)",
           "--pp 4 --batch-size 8 --microbatches 8", explainer="pp"),
    # ---- FSDP2's mixed precision (issue 11: torchtitan) -------------------------------------------------------
    Option("fsdp_param_dtype", "FSDP dtype", PARALLELISM, "select",
           "what FSDP2 gathers parameters in: as stored, autocast casting them (memtui's default), or bf16 with "
           "fp32 gradient reduction and no autocast (MixedPrecisionPolicy, torchtitan's)",
           "--zero 3 --gpus 8 --fsdp-param-dtype compute", ladder={"compute": "FSDP2 gathers in bf16 (no autocast)"},
           baseline="stored"),
    # ---- float8 linears (issue 11: torchtitan's float8 converter) ------------------------------------------
    Option("float8", "Float8", PRECISION_AND_OPTIMIZER, "select",
           "the decoder's linear layers as torchao Float8Linear (torchtitan's float8 converter): tensorwise-scaled "
           "float8 matmuls, the input and weight cast again in backward", "--float8 tensorwise",
           ladder={"tensorwise": "float8 linears (torchao, tensorwise)"}, baseline="off"),
    # ---- whose model code runs the step (issue 11: LitGPT) ---------------------------------------------------
    Option("modeling", "Model code", MODEL_AND_HARDWARE, "select",
           "whose model code runs the step: transformers' (adapters by peft) or LitGPT's GPT (one fused qkv "
           "projection, litgpt/lora.py's adapters)", "--modeling litgpt"),
)

OPTIONS: dict[str, Option] = {option.field: option for option in _OPTIONS}

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(option.group for option in _OPTIONS))


def label(field: str) -> str:
    """The planner's name for a field (for an error's "{field}"); anything else as is."""
    option = OPTIONS.get(field)
    return option.label if option is not None else field


def flag_table_rows() -> list[str]:
    """README's "Flags" table rows for the training options, in registry order."""
    return [option.table_row() for option in _OPTIONS]


__all__ = ["GROUPS", "OPTIONS", "Option", "flag_table_rows", "label"]

if __name__ == "__main__":  # print the README rows: python -m memtui.engine.model.options
    print("\n".join(flag_table_rows()))
