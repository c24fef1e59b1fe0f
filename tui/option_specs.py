"""The planner's inputs as data: which control each option gets, its label and its group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memtui.engine.model.specs import ATTENTIONS, CHECKPOINTING, OFFLOADS, OPTIMIZER_IMPLS, OPTIMIZERS, PRECISIONS, QUANTS

Kind = Literal["select", "int", "switch", "text", "model", "gpu", "path"]


@dataclass(frozen=True)
class OptionSpec:
    key: str  # a TrainingConfig field, or "model_path"
    label: str
    kind: Kind
    choices: tuple[str, ...] = ()
    explain_key: str = ""  # explainer to show; defaults to key
    summary_text: str = ""  # one-line description; defaults to the explainer's

    @property
    def summary(self) -> str:
        from memtui.tui.explain import summary

        return self.summary_text or summary(self.explainer)

    @property
    def explainer(self) -> str:
        return self.explain_key or self.key


GROUPS: tuple[tuple[str, tuple[OptionSpec, ...]], ...] = (
    ("Model & hardware", (
        OptionSpec("model", "Model", "model"),
        OptionSpec("model_path", "config.json", "path", explain_key="model",
                   summary_text="Or load your own config.json (Enter)."),
        OptionSpec("gpu", "GPU", "gpu"),
        OptionSpec("gpus", "GPU count", "int"),
    )),
    ("Workload", (
        OptionSpec("batch_size", "Batch size", "int"),
        OptionSpec("seq_len", "Seq length", "int"),
    )),
    ("Precision & optimizer", (
        OptionSpec("precision", "Precision", "select", PRECISIONS),
        OptionSpec("master_weights", "Master fp32", "switch"),
        OptionSpec("optimizer", "Optimizer", "select", OPTIMIZERS),
        OptionSpec("optimizer_impl", "Opt. impl", "select", OPTIMIZER_IMPLS),
        OptionSpec("galore_rank", "GaLore rank", "int"),
    )),
    ("Memory savers", (
        OptionSpec("checkpointing", "Checkpoint", "select", CHECKPOINTING),
        OptionSpec("attention", "Attention", "select", ATTENTIONS),
        OptionSpec("offload", "CPU offload", "select", OFFLOADS),
    )),
    ("Parallelism", (
        OptionSpec("zero", "ZeRO stage", "select", ("0", "1", "2", "3")),
        OptionSpec("tp", "Tensor par.", "int"),
        OptionSpec("pp", "Pipe. par.", "int"),
    )),
    ("Adapters & quantization", (
        OptionSpec("lora_rank", "LoRA rank", "int"),
        OptionSpec("lora_targets", "LoRA layers", "text"),
        OptionSpec("quant", "Quantize", "select", QUANTS),
    )),
)

OPTION_SPECS: dict[str, OptionSpec] = {spec.key: spec for _, specs in GROUPS for spec in specs}
