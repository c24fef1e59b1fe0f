"""The training stacks' memory defaults (`--stack`): what each framework does when a knob is left unset.

One table, one entry per stack. Each default is a TrainingConfig value with the place in the framework's own
code that sets it (repository, file, line or symbol, at the commit read). A stack only sets defaults: a recipe,
`--from FILE` and the flags typed override it (precedence: memtui's defaults < --stack < --recipe < --from FILE
< flags). `--from FILE` reads the keys a file leaves out with these same values where it needs one
(framework_configs reads them from here). What a stack does to memory that memtui cannot express yet is listed
as "not modelled yet" with the framework's value and source, and said in the notes whenever it applies; an
approximation is said in a note too. docs/stacks.md is this table (`python -m memtui.engine.model.stacks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, get_args

from memtui.engine.errors import InputError
from memtui.engine.model.specs import Stack, TrainingConfig

View = Mapping[str, Any]  # every option: TrainingConfig's defaults under what was given


def _softcapped(view: View) -> bool:
    from memtui.engine.model.presets import resolve_model

    try:
        return resolve_model(view["model"]).final_logit_softcapping is not None
    except InputError:
        return False  # the model's own error comes when the configuration is built


def _fsdp_would_cast(view: View) -> bool:
    """Whether --fsdp-param-dtype compute applies to these options (TrainingConfig.fsdp_casts decides)."""
    try:
        return TrainingConfig(**{**view, "fsdp_param_dtype": "compute"}).fsdp_casts
    except ValueError:  # a value out of its field's bounds: the configuration's own error comes when it is built
        return False


def litgpt_modelled(view: View) -> bool:
    """Whether validation accepts --modeling litgpt with these options."""
    from memtui.engine.model.presets import resolve_gpu, resolve_model
    from memtui.engine.model.validation import check_config

    try:
        config = TrainingConfig(**{**view, "modeling": "litgpt"})
        check_config(config, resolve_model(config.model), resolve_gpu(config.gpu))
    except (InputError, ValueError):
        return False
    return True


# Conditions on the other options, by name: (what it says in the docs, the test, why memtui cannot apply a value
# that needs it).
CONDITIONS: dict[str, tuple[str, Callable[[View], bool], str]] = {
    "lora": ("with LoRA", lambda view: view["lora_rank"] > 0, ""),
    "quant": ("with a 4/8-bit base", lambda view: view["quant"] != "none", ""),
    "unquantized": ("without a 4/8-bit base", lambda view: view["quant"] == "none",
                    "memtui models a 4/8-bit base computing in 16 bits"),
    "one-gpu": ("on one GPU", lambda view: view["gpus"] == 1, "memtui models it on one GPU only"),
    "several-gpus": ("on several GPUs", lambda view: view["gpus"] > 1, ""),
    "true-precision": ("with 16-bit weights and no autocast",
                       lambda view: view["precision"] in ("16-true", "bf16-true"), ""),
    "chunked-loss": ("with --loss chunked", lambda view: view["loss"] == "chunked", ""),
    "standard-loss": ("with --loss standard", lambda view: view["loss"] == "standard", ""),
    "no-softcap": ("for a model without final-logit soft-capping", lambda view: not _softcapped(view),
                   "the model soft-caps its logits, which memtui's chunked and fused losses do not"),
    "fsdp2-full-bf16": ("with FSDP2 sharding a full bf16-mixed fine-tune",
                        lambda view: _fsdp_would_cast(view),
                        "memtui models FSDP2's bf16 casting for a full bf16-mixed fine-tune sharded by FSDP2 alone "
                        "(no LoRA, quantized base, offload, tensor or pipeline parallelism); autocast stands in"),
    "litgpt-model": ("with a model and options --modeling litgpt models", litgpt_modelled,
                     "memtui models LitGPT's GPT for untied Llama/Mistral configs on one GPU, unquantized, bf16-true "
                     "or 16-true, with its chunked head and loss"),
    "no-fp16-autocast": ("without --precision 16-mixed", lambda view: view["precision"] != "16-mixed",
                         "under 16-mixed memtui's compute-dtype adapters are fp16, whose gradients the GradScaler "
                         "refuses; the framework's are bf16"),
}


@dataclass(frozen=True)
class Derived:
    """A value computed from the other options, with its rule in words for the docs."""

    rule: str
    compute: Callable[[View], Any]


@dataclass(frozen=True)
class Default:
    """One knob's default in a stack: a TrainingConfig field and value, and where the framework sets it."""

    field: str
    value: Any  # the field's value, or a Derived one
    source: str  # file and line or symbol in the stack's repository
    when: tuple[str, ...] = ()  # the framework's own conditions (LoRA on, several GPUs): else it does not apply
    needs: tuple[str, ...] = ()  # what memtui needs to model the value: else not applied, and a note says so
    note: str = ""  # the approximation memtui makes, said whenever the value is applied

    def value_text(self) -> str:
        return self.value.rule if isinstance(self.value, Derived) else str(self.value).lower()


@dataclass(frozen=True)
class NotModelled:
    """Something a stack does to memory by default that memtui has no option for yet."""

    knob: str
    value: str
    source: str
    why: str
    when: tuple[str, ...] = ()


@dataclass(frozen=True)
class StackDefaults:
    id: str
    name: str
    repository: str
    commit: str
    date: str  # the commit's date
    entry: str  # the entry point whose defaults these are
    defaults: tuple[Default, ...]
    not_modelled: tuple[NotModelled, ...] = ()
    leaves_to_you: str = ""  # what the framework does not default (your own code decides it)

    def default(self, field: str) -> Default:
        return next(default for default in self.defaults if default.field == field)

    def value(self, field: str) -> Any:
        """A plain default's value (the one `--from FILE` assumes for a key the file leaves out)."""
        return self.default(field).value


def _litgpt_grad_accum(view: View) -> int:
    # litgpt/args.py TrainArgs.gradient_accumulation_iters: global_batch_size // (devices x nodes) // micro_batch
    return max(1, 16 // view["gpus"] // view["batch_size"])


_TITAN_SAC = "selective_ac_option \"2\" checkpoints every second block whole and the others not at all"

_STACKS = (
    StackDefaults(
        "hf", "Hugging Face Trainer", "huggingface/transformers", "00349ae87eddc872ffa21a8a54f264375a0056a8",
        "v5, commit date not recorded",
        "transformers.Trainer with TrainingArguments' defaults; LoRA through peft.get_peft_model",
        (
            Default("batch_size", 8, "src/transformers/training_args.py: per_device_train_batch_size default=8"),
            Default("grad_accum", 1, "training_args.py: gradient_accumulation_steps default=1"),
            Default("precision", "bf16-true",
                    "training_args.py: bf16=False, fp16=False (no autocast); from_pretrained loads the checkpoint's "
                    "dtype since v5 (huggingface/trl trl/trainer/sft_trainer.py:821 says so)",
                    note="the weights keep the checkpoint's dtype (bf16 for current checkpoints) with no autocast; "
                         "a float32 checkpoint or transformers 4.x (float32 by default) is --precision 32-true"),
            Default("checkpointing", "none", "training_args.py: gradient_checkpointing default=False"),
            Default("optimizer", "adamw", "training_args.py: optim default_optim"),
            Default("optimizer_impl", "fused",
                    "training_args.py: default_optim = \"adamw_torch_fused\" with torch >= 2.8 (else adamw_torch)"),
            Default("attention", "flash", "attn_implementation unset: sdpa (modeling_utils.py)"),
            Default("loss", "standard", "src/transformers/loss/loss_utils.py ForCausalLMLoss: logits.float()"),
            Default("lora_dropout", 0.0, "huggingface/peft src/peft/tuners/lora/config.py:634 lora_dropout=0.0",
                    when=("lora",)),
            Default("lora_dtype", "fp32", "huggingface/peft src/peft/mapping_func.py:110 autocast_adapter_dtype=True",
                    when=("lora",)),
            Default("kbit_prep", False, "Trainer never calls peft's prepare_model_for_kbit_training (your script may)",
                    when=("quant",)),
            Default("activation_offload", False, "Trainer has no activation offloading"),
            Default("optimizer_in_backward", False, "Trainer steps after backward (Trainer._inner_training_loop)"),
        ),
    ),
    StackDefaults(
        "trl", "TRL SFTTrainer", "huggingface/trl", "f2cd57710ae345ea6428ae95363267fcf38a3dc8", "2026-07-24",
        "trl.SFTTrainer with SFTConfig's defaults, the model given by name; LoRA from trl's ModelConfig",
        (
            Default("batch_size", 8, "TrainingArguments per_device_train_batch_size=8 (SFTConfig keeps it)"),
            Default("seq_len", 1024, "trl/trainer/sft_config.py:205 max_length default=1024",
                    note="max_length=1024 truncates; memtui plans for full 1024-token sequences"),
            Default("grad_accum", 1, "TrainingArguments gradient_accumulation_steps=1"),
            Default("precision", "bf16-mixed",
                    "trl/trainer/base_config.py:105 bf16 = not fp16 (autocast); trl/trainer/sft_trainer.py:820 the "
                    "model loads in float32 unless model_init_kwargs gives a dtype"),
            Default("checkpointing", "full", "trl/trainer/base_config.py:61 gradient_checkpointing default=True"),
            Default("optimizer", "adamw", "TrainingArguments optim (adamw_torch_fused)"),
            Default("optimizer_impl", "fused", "TrainingArguments default_optim adamw_torch_fused (torch >= 2.8)"),
            Default("attention", "flash", "ModelConfig attn_implementation=None: transformers' sdpa"),
            Default("loss", "fused-linear",
                    "trl/trainer/sft_config.py:336 loss_type defaults to chunked_nll; sft_trainer.py:86 "
                    "_CHUNKED_LM_HEAD_CHUNK_SIZE=256",
                    needs=("one-gpu", "no-softcap"),
                    note="loss_type chunked_nll (the head on 256-token chunks, each checkpointed: the full logits "
                         "never exist) is modelled as --loss fused-linear, which keeps Liger's allocations"),
            Default("lora_dropout", 0.05, "trl/trainer/model_config.py:116 ModelConfig.lora_dropout default=0.05",
                    when=("lora",)),
            Default("lora_dtype", "fp32", "peft autocast_adapter_dtype=True (sft_trainer.py get_peft_model)",
                    when=("lora", "unquantized")),
            Default("lora_dtype", "compute",
                    "trl/trainer/sft_trainer.py:1127 a quantized model's trainable parameters are cast to bfloat16",
                    when=("lora", "quant"), needs=("no-fp16-autocast",)),
            Default("kbit_prep", False,
                    "trl/trainer/sft_trainer.py:1097 get_peft_model alone: SFTTrainer stopped calling peft's "
                    "prepare_model_for_kbit_training in huggingface/trl#4577 (2025-12-04, TRL 0.26.0)",
                    when=("quant",)),
            Default("activation_offload", False, "trl/trainer/sft_config.py:296 activation_offloading default=False"),
            Default("optimizer_in_backward", False, "Trainer steps after backward"),
        ),
    ),
    StackDefaults(
        "torchtune", "torchtune", "pytorch/torchtune", "bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1", "2026-04-23",
        "recipes/lora_finetune_single_device.py and full_finetune_single_device.py with the shipped configs "
        "(recipes/configs/llama3_2/1B_lora_single_device.yaml) where the recipe has no default",
        (
            Default("precision", "bf16-true", "recipes/configs/*: dtype: bf16 (the recipe's cfg.dtype; "
                                              "torchtune/training/precision.py get_dtype(None) is fp32)"),
            Default("checkpointing", "none",
                    "recipes/lora_finetune_single_device.py:181 cfg.get(\"enable_activation_checkpointing\", False)"),
            Default("activation_offload", False,
                    "recipes/lora_finetune_single_device.py:184 cfg.get(\"enable_activation_offloading\", False)"),
            Default("optimizer", "adamw", "recipes/configs/*: optimizer._component_: torch.optim.AdamW"),
            Default("optimizer_impl", "fused", "recipes/configs/*: optimizer.fused: True"),
            Default("attention", "flash", "torchtune/modules/attention.py: F.scaled_dot_product_attention"),
            Default("loss", "chunked",
                    "recipes/configs/*: loss._component_ LinearCrossEntropyLoss (162 of 174 configs); "
                    "torchtune/modules/loss/cross_entropy_loss.py:36 num_output_chunks=8",
                    needs=("one-gpu", "no-softcap"),
                    note="LinearCrossEntropyLoss projects each of 8 chunks inside the loss and upcasts it to fp32, so "
                         "only one chunk's compute-dtype logits exist at a time; memtui's chunked loss keeps every "
                         "chunk's (CEWithChunkedOutputLoss), an over-estimate of one compute-dtype copy of the logits"),
            Default("loss_chunks", 8, "torchtune/modules/loss/cross_entropy_loss.py:36 num_output_chunks: int = 8",
                    when=("chunked-loss",)),
            Default("logits_upcast", "model",
                    "torchtune/modules/transformer.py:687 TransformerDecoder.unembed: self.output(h).float() "
                    "(its chunked output stays in the compute dtype)", when=("standard-loss",)),
            Default("lora_dtype", "compute",
                    "torchtune/modules/peft/lora.py:27 LoRALinear: adapters in the model's dtype", when=("lora",)),
            Default("lora_dropout", 0.0, "torchtune/modules/peft/lora.py:63 LoRALinear dropout=0.0", when=("lora",)),
            Default("kbit_prep", False, "torchtune's QLoRA is torchao's NF4Tensor, without peft", when=("quant",)),
            Default("optimizer_in_backward", False,
                    "recipes/full_finetune_single_device.py:151 cfg.optimizer_in_bwd (False in the configs)"),
        ),
        leaves_to_you="batch_size and gradient_accumulation_steps: each config sets its own (1B LoRA: 4 and 8)",
    ),
    StackDefaults(
        "litgpt", "LitGPT", "Lightning-AI/litgpt", "26857050fe3ff627cd714fe92f5838f51a3d5efa", "2026-06-29",
        "litgpt finetune_lora (litgpt/finetune/lora.py setup) on a CUDA GPU with bf16",
        (
            Default("precision", "bf16-mixed",
                    "litgpt/finetune/lora.py:131 get_default_supported_precision(training=True) -> bf16-mixed "
                    "(litgpt/utils.py:377)", when=("unquantized",)),
            Default("precision", "bf16-true",
                    "litgpt/finetune/lora.py:142 quantize refuses a mixed precision", when=("quant",)),
            Default("batch_size", 1, "litgpt/finetune/lora.py:70 TrainArgs(micro_batch_size=1)"),
            Default("grad_accum", Derived("16 / GPUs / batch", _litgpt_grad_accum),
                    "litgpt/finetune/lora.py:69 TrainArgs(global_batch_size=16); litgpt/args.py "
                    "gradient_accumulation_iters"),
            Default("optimizer", "adamw", "litgpt/finetune/lora.py:78 optimizer=\"AdamW\" (torch.optim.AdamW)"),
            Default("optimizer_impl", "foreach", "torch.optim.AdamW's default on CUDA"),
            Default("checkpointing", "none", "litgpt/finetune/lora.py:164 strategy=\"auto\" on one device",
                    when=("one-gpu",)),
            Default("checkpointing", "full",
                    "litgpt/finetune/lora.py:522 parallelize_fn(activation_checkpointing=True): each block",
                    when=("several-gpus",)),
            Default("zero", 3, "litgpt/finetune/lora.py:152 ModelParallelStrategy with fully_shard (FSDP2)",
                    when=("several-gpus",)),
            Default("attention", "flash", "litgpt/model.py CausalSelfAttention: F.scaled_dot_product_attention"),
            Default("loss", "chunked",
                    "litgpt/finetune/lora.py:355 model(input_ids, lm_head_chunk_size=128) and chunked_cross_entropy "
                    "(litgpt/utils.py:302)",
                    needs=("one-gpu", "no-softcap"),
                    note="the head runs on 128-token chunks (--loss chunked, one chunk per 128 tokens)"),
            Default("loss_chunks", Derived("sequence / 128, at most 1024",
                                           lambda view: min(1024, max(1, math.ceil(view["seq_len"] / 128)))),
                    "litgpt/finetune/lora.py:355 lm_head_chunk_size=128", when=("chunked-loss",)),
            Default("lora_dropout", 0.05, "litgpt/finetune/lora.py:58 lora_dropout=0.05", when=("lora",)),
            Default("lora_dtype", "compute",
                    "litgpt/lora.py:89 LoRALinear: adapters converted with the model by Fabric's precision",
                    when=("lora",)),
            Default("kbit_prep", False, "LitGPT quantizes through Fabric's BitsandbytesPrecision, without peft",
                    when=("quant",)),
            Default("activation_offload", False, "LitGPT has no activation offloading"),
            Default("optimizer_in_backward", False, "litgpt/finetune/lora.py fit(): optimizer.step() after backward"),
            Default("loss_dtype", "compute",
                    "litgpt/utils.py:326 chunked_cross_entropy: F.cross_entropy on the chunks without .float()",
                    when=("chunked-loss",),
                    note="the cross-entropy in the logits' dtype, no fp32 upcast (fp32 only where autocast runs "
                         "log_softmax in fp32)"),
            # last: whether memtui models LitGPT's GPT depends on the values above
            Default("modeling", "litgpt", "litgpt/finetune/lora.py setup: GPT(config) from litgpt/lora.py (fused qkv, "
                    "LoRAQKVLinear)", needs=("litgpt-model",)),
        ),
        leaves_to_you="max_seq_length: None trains on the longest sample of the dataset; give --seq-len",
    ),
    StackDefaults(
        "lightning", "PyTorch Lightning", "Lightning-AI/pytorch-lightning",
        "7f0c3436cd3f6ad3753125672024fc415cbcb414", "2026-07-20",
        "lightning.pytorch.Trainer's defaults around your LightningModule",
        (
            Default("precision", "32-true",
                    "src/lightning/pytorch/trainer/connectors/accelerator_connector.py:265 precision None -> "
                    "\"32-true\"", needs=("unquantized",)),
            Default("grad_accum", 1, "src/lightning/pytorch/trainer/trainer.py:119 accumulate_grad_batches=1"),
            Default("batch_size", 1, "torch.utils.data.DataLoader batch_size=1 (your DataLoader decides)"),
            Default("checkpointing", "none",
                    "the Trainer checkpoints nothing (FSDPStrategy activation_checkpointing_policy=None)"),
            Default("zero", 0, "trainer.py:95 strategy=\"auto\": DDP on several GPUs", when=("several-gpus",)),
            Default("offload", "none", "strategy=\"auto\" offloads nothing"),
            Default("activation_offload", False, "the Trainer has no activation offloading"),
            Default("optimizer_in_backward", False, "the Trainer steps after backward (automatic optimization)"),
        ),
        leaves_to_you="the optimizer (configure_optimizers), the attention and the loss are your module's: "
                      "memtui keeps its own (adamw foreach, flash, standard); give --optimizer, --attention, --loss",
    ),
    StackDefaults(
        "torchtitan", "torchtitan", "pytorch/torchtitan", "238fa9953e4aec2a62582121564273d7cbb1e9f1", "2026-02-23",
        "torchtitan's JobConfig (the TOML format `--from` reads; later commits replace it with Python configs "
        "holding the same defaults)",
        (
            Default("batch_size", 8, "torchtitan/config/job_config.py:253 Training.local_batch_size=8"),
            Default("seq_len", 2048, "torchtitan/config/job_config.py:261 Training.seq_len=2048"),
            Default("grad_accum", 1, "torchtitan/config/job_config.py:256 Training.global_batch_size=-1 (no "
                                     "accumulation)"),
            Default("precision", "bf16-mixed",
                    "torchtitan/config/job_config.py:282 Training.mixed_precision_param=\"bfloat16\" (fp32 weights, "
                    "bf16 compute)"),
            Default("checkpointing", "selective",
                    "torchtitan/config/job_config.py:652 ActivationCheckpoint.mode=\"selective\""),
            Default("optimizer", "adamw", "torchtitan/config/job_config.py:135 Optimizer.name=\"AdamW\""),
            Default("optimizer_impl", "fused",
                    "torchtitan/config/job_config.py:151 Optimizer.implementation=\"fused\""),
            Default("optimizer_in_backward", False,
                    "torchtitan/config/job_config.py:160 Optimizer.early_step_in_backward=False"),
            Default("zero", 3, "torchtitan/config/job_config.py:324 data_parallel_shard_degree=-1: FSDP2 over every "
                               "rank, fsdp_reshard_after_forward=\"default\"", when=("several-gpus",)),
            Default("attention", "flash", "torchtitan/models/attention.py: F.scaled_dot_product_attention"),
            Default("fsdp_param_dtype", "compute",
                    "torchtitan/models/llama3/infra/parallelize.py:313 apply_fsdp: MixedPrecisionPolicy(param_dtype="
                    "mixed_precision_param, reduce_dtype=mixed_precision_reduce), bfloat16 / float32 "
                    "(config/job_config.py:282, 290); autocast only without FSDP (distributed/utils.py:243 "
                    "maybe_enable_amp)",
                    when=("several-gpus",), needs=("fsdp2-full-bf16",)),
            Default("loss", "standard", "torchtitan/components/loss.py:20 cross_entropy_loss: pred.float()"),
            Default("activation_offload", False, "torchtitan has no activation offloading"),
        ),
        not_modelled=(
            NotModelled("activation_checkpoint.selective_ac_option", "\"2\"",
                        "torchtitan/config/job_config.py:655 selective_ac_option=\"2\"",
                        f"{_TITAN_SAC} (layer-level SAC); memtui's selective checkpointing stands in"),
        ),
    ),
    StackDefaults(
        "axolotl", "Axolotl", "axolotl-ai-cloud/axolotl", "067b021c8b87a9e5e380b9173c704cf7340e30f5", "2026-07-24",
        "axolotl train with its config schema's defaults (src/axolotl/utils/schemas)",
        (
            Default("batch_size", 1, "src/axolotl/utils/schemas/training.py:77 micro_batch_size default=1"),
            Default("grad_accum", 1, "src/axolotl/utils/schemas/training.py:71 gradient_accumulation_steps default=1"),
            Default("seq_len", 512, "src/axolotl/utils/schemas/config.py:665 sequence_len default=512"),
            Default("precision", "bf16-true",
                    "src/axolotl/utils/schemas/config.py:559 bf16 default=\"auto\": the weights load in bfloat16 "
                    "(normalize_config torch_dtype)"),
            Default("checkpointing", "none", "src/axolotl/utils/schemas/config.py:600 gradient_checkpointing "
                                             "default=False"),
            Default("optimizer", "adamw", "src/axolotl/utils/schemas/training.py:122 optimizer "
                                          "default=\"adamw_torch_fused\""),
            Default("optimizer_impl", "fused", "src/axolotl/utils/schemas/training.py:122 adamw_torch_fused"),
            Default("attention", "flash", "attn_implementation unset: transformers' sdpa"),
            Default("loss", "standard", "liger_fused_linear_cross_entropy and cut_cross_entropy default off "
                                        "(src/axolotl/integrations/liger/args.py:55)"),
            Default("lora_dropout", 0.0, "src/axolotl/utils/schemas/peft.py:80 lora_dropout default=0.0",
                    when=("lora",)),
            Default("lora_dtype", "fp32",
                    "src/axolotl/loaders/adapter.py:368 peft_autocast_adapter_dtype unset: peft's True",
                    when=("lora",)),
            Default("kbit_prep", False,
                    "src/axolotl/loaders/model.py:1021 prepare_model_for_kbit_training (every unquantized weight to "
                    "fp32), then _configure_embedding_dtypes (model.py:459-477, should_convert for every LoRA/QLoRA "
                    "adapter) casts the norms, embed_tokens and lm_head back to the load dtype",
                    when=("quant",),
                    note="Axolotl runs peft's k-bit prep on a quantized base, then casts the norms, embeddings and "
                         "head back to 16 bits for an adapter; --kbit-prep would keep them in fp32, so it is modelled "
                         "as --kbit-prep off (what stays fp32, a quantized layer's bias, is not modelled)"),
            Default("activation_offload", False, "src/axolotl/utils/schemas/config.py:623 activation_offloading "
                                                 "default=False"),
            Default("optimizer_in_backward", False, "the Trainer steps after backward"),
        ),
    ),
)

STACKS: dict[str, StackDefaults] = {stack.id: stack for stack in _STACKS}
STACK_IDS: tuple[str, ...] = tuple(choice for choice in get_args(Stack) if choice != "none")
# Every field some stack sets.
STACK_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(default.field for stack in _STACKS for default in stack.defaults))


def stack(stack_id: str) -> StackDefaults:
    entry = STACKS.get(stack_id)
    if entry is None:
        raise InputError("stack", f"{stack_id!r} is not a valid choice", ", ".join(get_args(Stack)))
    return entry


def _holds(condition: str, view: View) -> bool:
    return CONDITIONS[condition][1](view)


@cache
def _memtui_defaults() -> dict[str, Any]:
    return TrainingConfig().model_dump()


def framework_values(stack_id: str, options: Mapping[str, Any],
                     fields: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """The stack's values for `fields` given the rest of the options, and the notes that go with them: its
    approximations, and the values memtui cannot apply here. `--from FILE` maps what a file's keys bring about in
    the framework's code (TRL casting a quantized model's adapters to bf16) through this too."""
    entry = stack(stack_id)
    view = {**_memtui_defaults(), **options}
    values: dict[str, Any] = {}
    notes: list[str] = []
    for default in entry.defaults:
        if default.field not in fields or default.field in values:
            continue
        if not all(_holds(condition, view) for condition in default.when):
            continue
        value = default.value.compute(view) if isinstance(default.value, Derived) else default.value
        unmet = [condition for condition in default.needs if not _holds(condition, view)]
        if unmet:
            notes.append(f"{default.field}={value} not applied ({CONDITIONS[unmet[0]][2]})")
            continue
        values[default.field] = view[default.field] = value
        if default.note:
            notes.append(default.note)
    return values, notes


def stack_defaults(stack_id: str, options: Mapping[str, Any],
                   unset: tuple[str, ...] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The stack's values for the fields it may set (`unset`: every field `options` leaves out), given the rest
    of the options, and the notes that go with them: approximations, values memtui cannot apply here, and what
    the stack does that memtui does not model yet."""
    if stack_id == "none":
        return {}, []
    entry = stack(stack_id)
    settable = unset if unset is not None else tuple(field for field in STACK_FIELDS if field not in options)
    values, notes = framework_values(stack_id, options, settable)
    notes = [f"--stack {entry.id}: {note}" for note in notes]
    view = {**_memtui_defaults(), **options, **values}
    for item in entry.not_modelled:
        if all(_holds(condition, view) for condition in item.when):
            notes.append(f"not modelled yet: {item.knob}={item.value} ({entry.name}: {item.why})")
    return values, notes


def planner_values(stack_id: str, options: Mapping[str, Any],
                   previous: str = "none") -> tuple[dict[str, Any], list[str]]:
    """Choosing a stack in the planner, over `previous`: the fields either stack sets, to this stack's value
    where it has one for the other options, else memtui's default; the other options stay as they are."""
    fields = tuple(dict.fromkeys(default.field for name in (previous, stack_id) if name != "none"
                                 for default in stack(name).defaults))
    context = {key: value for key, value in options.items() if key not in fields}
    values, notes = stack_defaults(stack_id, context, unset=fields)
    defaults = _memtui_defaults()
    return {field: values.get(field, defaults[field]) for field in fields}, notes


# ---- docs/stacks.md --------------------------------------------------------------------------------------
def _conditions_text(default: Default) -> str:
    parts = [CONDITIONS[condition][0] for condition in default.when]
    parts += [f"{CONDITIONS[condition][0]} (memtui)" for condition in default.needs]
    return "; ".join(parts)


def stack_markdown(stack_id: str) -> str:
    """One stack's defaults with their sources, as docs/stacks.md and the planner's explainer show them."""
    entry = stack(stack_id)
    lines = [f"## `--stack {entry.id}`: {entry.name}", "",
             f"{entry.entry}. Read from [{entry.repository}](https://github.com/{entry.repository}) at "
             f"`{entry.commit[:12]}` ({entry.date}).", "",
             "| option | default | when | source |", "| --- | --- | --- | --- |"]
    for default in entry.defaults:
        value = default.value_text()
        note = f" ({default.note})" if default.note else ""
        lines.append(f"| `{default.field}` | `{value}` | {_conditions_text(default) or 'always'} | "
                     f"{default.source}{note} |")
    if entry.not_modelled:
        lines += ["", "Not modelled yet:", ""]
        lines += [f"- `{item.knob}` = {item.value}: {item.why} ({item.source})" for item in entry.not_modelled]
    if entry.leaves_to_you:
        lines += ["", f"Left to your code or config: {entry.leaves_to_you}."]
    return "\n".join(lines) + "\n"


def stacks_markdown() -> str:
    return "\n".join(stack_markdown(stack_id) for stack_id in STACK_IDS)


__all__ = ["CONDITIONS", "STACKS", "STACK_FIELDS", "STACK_IDS", "Default", "Derived", "NotModelled",
           "StackDefaults", "framework_values", "planner_values", "stack", "stack_defaults", "stack_markdown",
           "stacks_markdown"]

if __name__ == "__main__":  # the tables of docs/stacks.md: python -m memtui.engine.model.stacks
    print(stacks_markdown(), end="")
