"""Training configs as the frameworks write them, mapped onto TrainingConfig (`--from FILE`).

Five formats, told apart by extension and content: Hugging Face TrainingArguments / TRL SFTConfig (JSON or
YAML), a torchtune recipe YAML, a LitGPT finetune YAML, a torchtitan TOML and an Axolotl YAML. Every key
that decides memory is mapped onto a TrainingConfig field; a key that decides memory in a way memtui
cannot express yet becomes a note ("ignored: key=value (why)"), never silently dropped; keys that do not
touch memory (learning rates, logging, datasets) are ignored quietly. A bad value is an InputError whose
field is "FILE: key". The key names are each framework's own, with the file in its repository that
defines them cited beside each mapping.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import _read_config_text, read_json_file
from memtui.engine.model.hub import is_hub_id
from memtui.engine.model.presets import models, resolve_model
from memtui.engine.model.specs import TrainingConfig
# Each framework's defaults, for the keys a file leaves out and for what its code does with the keys given.
from memtui.engine.model.stacks import STACKS, framework_values, litgpt_modelled
from memtui.engine.model.validation import HEAD_TARGET

FORMATS = ("hf", "torchtune", "litgpt", "torchtitan", "axolotl")
FORMAT_NAMES = {
    "hf": "Hugging Face TrainingArguments / TRL SFTConfig",
    "torchtune": "torchtune recipe",
    "litgpt": "LitGPT finetune config",
    "torchtitan": "torchtitan job config",
    "axolotl": "Axolotl config",
}


@dataclass(frozen=True)
class FrameworkConfig:
    """What a framework's config file says about memory, as TrainingConfig fields, and what it could not say."""

    path: str
    format: str
    options: dict[str, Any]
    notes: tuple[str, ...]


_MISSING = object()
_truthy = bool  # the class below names a method `bool`


@dataclass
class _Reader:
    """One file's values, looked up by dotted key; every refusal names the file and the key."""

    source: str
    data: Mapping[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        value: Any = self.data
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return default
            value = value[part]
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def error(self, key: str, message: str, allowed: str | None = None) -> InputError:
        return InputError(f"{self.source}: {key}", message, allowed)

    def int(self, key: str, minimum: int = 1) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"{_quoted(value)} is not a whole number", f"whole numbers from {minimum}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str) -> float | None:
        """A decimal number (a probability such as lora_dropout); its bounds are the field's, checked by set()."""
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"{_quoted(value)} is not a number")
        return float(value)

    def bool(self, key: str) -> bool | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.error(key, f"{_quoted(value)} is not true or false", "true, false")
        return value

    def text(self, key: str) -> str | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"{_quoted(value)} is not text")
        return value

    def choice(self, key: str, table: Mapping[str, Any]) -> Any:
        """The table's entry for the key's value (case-insensitive), or an error listing the values memtui reads."""
        value = self.get(key)
        if value is None:
            return None
        entry = table.get(str(value).lower()) if isinstance(value, (str, bool)) else None
        if entry is None:
            raise self.error(key, f"{_quoted(value)} is not a value memtui can model", ", ".join(table))
        return entry

    def set(self, key: str, field_name: str, value: Any) -> None:
        """Map the key's value onto a field, checked against the field's type and bounds now, naming the key."""
        if value is None:
            return
        try:
            TrainingConfig.model_validate({field_name: value})
        except ValidationError as error:
            first = error.errors()[0]
            raise self.error(key, f"{_quoted(value)}: {first['msg']}") from None
        self.options[field_name] = value

    def ignore(self, key: str, why: str, when: Callable[[Any], bool] = _truthy) -> None:
        """Note a key that decides memory in a way memtui cannot express, when its value makes a difference."""
        value = self.get(key)
        if value is not None and when(value):
            self.notes.append(f"ignored: {key}={_shown(value)} ({why})")

    def note(self, text: str) -> None:
        self.notes.append(text)


def _framework_values(reader: _Reader, stack_id: str, key: str, *fields: str) -> None:
    """What the framework's code does with what `key` says (not a key of its own), from its stack's table,
    mapped from `key`, with the table's approximation note."""
    values, notes = framework_values(stack_id, reader.options, fields)
    for field_name, value in values.items():
        reader.set(key, field_name, value)
    for note in notes:
        reader.note(f"{key}: {note}")


def _or_default(value: Any, default: Any) -> Any:
    """A key's value, or the framework's own default when the file leaves it out."""
    return default if value is None else value


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _quoted(value: Any) -> str:
    """A value in an error: text in quotes, so `four` reads as the value it is."""
    return repr(_shown(value)) if isinstance(value, str) else _shown(value)


def _more_than_one(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _map_fused_loss(reader: _Reader, key: str, why: str = "", *, chosen: bool | None = None) -> None:
    """A fused linear cross-entropy (Liger, cut-cross-entropy), switched on by `key` (or `chosen`): memtui's
    fused-linear loss, which it models on one GPU (the head runs outside the DDP/FSDP wrapper there)."""
    if not (reader.bool(key) if chosen is None else chosen):
        return
    if reader.options.get("gpus", 1) > 1:
        reader.note(f"ignored: {key}={_shown(reader.get(key))} (memtui models the fused linear cross-entropy on one "
                    "GPU only)")
        return
    reader.set(key, "loss", "fused-linear")
    if why:
        reader.note(f"{key}: {why}")


# ---- torch.compile -------------------------------------------------------------------------------------------
def _map_compile(reader: _Reader, key: str, how: str, *, chosen: bool | None = None) -> None:
    """torch.compile switched on by `key` (or `chosen`): memtui's --compile, which compiles each decoder layer and
    the loss; `how` says what the framework compiles where that differs (the whole model, the layers alone)."""
    if not (reader.bool(key) if chosen is None else chosen):
        return
    reader.set(key, "compile", True)
    if how:
        reader.note(f"{key}: {how}")


# ---- models --------------------------------------------------------------------------------------------
# Suffixes of a Hub repository's name that do not change the architecture's memory (a chat tune of the base).
_SAME_ARCHITECTURE = {"instruct", "hf", "it", "chat", "base", "v0.1", "v0.2", "v0.3", "4k"}


def preset_for_name(name: str, presets: list[str]) -> str | None:
    """The preset a Hub id or checkpoint folder names ("meta-llama/Llama-3.2-1B-Instruct" -> llama-3.2-1b)."""
    tail = name.rstrip("/").split("/")[-1].lower().removeprefix("meta-")
    for preset in sorted(presets, key=len, reverse=True):
        if tail == preset:
            return preset
        if tail.startswith(preset + "-") and all(part in _SAME_ARCHITECTURE
                                                for part in tail[len(preset) + 1:].split("-")):
            return preset
    return None


def _set_model(reader: _Reader, key: str, name: str | None) -> None:
    """A preset where the name matches one, else a Hub id (memtui reads its config.json), else unset."""
    if not name:
        return
    presets = list(models())
    preset = preset_for_name(name, presets)
    if preset is not None:
        reader.options["model"] = preset
        return
    if Path(name).expanduser().exists():
        reader.options["model"] = name  # a local checkpoint folder with its config.json
        return
    parts = name.rstrip("/").split("/")
    hub_id = "/".join(parts[-2:]) if len(parts) >= 2 else name
    if is_hub_id(hub_id) and not Path(name).is_absolute():
        reader.options["model"] = hub_id
        return
    reader.note(f"model not set: {key}={_shown(name)} is neither a memtui preset nor a Hub id org/name; "
                "give --model")


# ---- shared by Hugging Face, TRL and Axolotl --------------------------------------------------------------
# transformers/src/transformers/training_args.py, OptimizerNames: the `optim` values. An entry is
# (memtui optimizer, optimizer_impl or None, note or "").
_PAGED = "paged optimizer states: memtui keeps them on the GPU"
_HF_OPTIMIZERS: dict[str, tuple[str, str | None, str]] = {
    "adamw_torch": ("adamw", "foreach", ""),
    "adamw_torch_fused": ("adamw", "fused", ""),
    "adamw_hf": ("adamw", "for-loop", ""),
    "adamw_apex_fused": ("adamw", "fused", ""),
    "adamw_bnb_8bit": ("adamw-8bit", None, ""),
    "adamw_8bit": ("adamw-8bit", None, ""),
    "paged_adamw_8bit": ("paged-adamw-8bit", None, ""),  # bnb PagedAdamW8bit
    "paged_adamw": ("paged-adamw", None, ""),  # bnb PagedAdamW (optim_bits=32)
    "paged_adamw_32bit": ("paged-adamw", None, ""),  # bnb PagedAdamW32bit
    "adafactor": ("adafactor", None, ""),
    "sgd": ("sgd", None, ""),
    "lion_32bit": ("lion", None, ""),
    "paged_lion_32bit": ("lion", None, _PAGED),
    "lion_8bit": ("lion", None, "8-bit Lion state: modelled as a 32-bit one"),
    "paged_lion_8bit": ("lion", None, "paged 8-bit Lion state: modelled as a 32-bit one on the GPU"),
    "galore_adamw": ("galore-adamw", None, ""),
    "galore_adamw_layerwise": ("galore-adamw", None, "layer-wise GaLore steps in backward: modelled as one step"),
    "galore_adamw_8bit": ("galore-adamw", None, "8-bit GaLore states: modelled as 32-bit"),
}


def _map_hf_optimizer(reader: _Reader, key: str) -> None:
    entry = reader.choice(key, _HF_OPTIMIZERS)
    if entry is None:
        return
    optimizer, impl, why = entry
    reader.set(key, "optimizer", optimizer)
    if impl is not None:
        reader.set(key, "optimizer_impl", impl)
    if why:
        reader.note(f"ignored: {key}={reader.get(key)} ({why})")
    if optimizer == "sgd":
        # transformers builds torch.optim.SGD from optim_args (default momentum 0).
        args = reader.get("optim_args") or ""
        if re.search(r"momentum\s*=\s*0*\.?0*[1-9]", str(args)):
            reader.set("optim_args", "optimizer", "sgd-momentum")
    if optimizer == "galore-adamw":
        match = re.search(r"rank\s*=\s*(\d+)", str(reader.get("optim_args") or ""))
        if match:
            reader.set("optim_args", "galore_rank", int(match.group(1)))


# transformers/training_args.py: torch_compile (False); a torch_compile_backend or torch_compile_mode turns it on
# whatever torch_compile says (__post_init__), and accelerate compiles the whole model (torch.compile(model),
# Accelerator.prepare_model).
_WHOLE_MODEL = ("the Trainer compiles the whole model through accelerate; memtui compiles each decoder layer and "
                "the loss, and keeps the embeddings and head eager")


def _map_trainer_compile(reader: _Reader, *, axolotl: bool = False) -> None:
    """The Trainer's torch_compile. Axolotl's takes "auto" (true with torch >= 2.5.1, check_torch_compile_auto)
    and hands the backend and mode to TrainingArguments only with torch_compile on (_configure_torch_compile)."""
    implied = None if axolotl else next((key for key in ("torch_compile_backend", "torch_compile_mode")
                                         if reader.get(key)), None)
    if implied and not reader.get("torch_compile"):
        _map_compile(reader, implied, _WHOLE_MODEL, chosen=True)
    elif axolotl and reader.get("torch_compile") == "auto":
        _map_compile(reader, "torch_compile", _WHOLE_MODEL, chosen=True)
    else:
        _map_compile(reader, "torch_compile", _WHOLE_MODEL)
    if not reader.options.get("compile"):
        return
    reader.ignore("torch_compile_backend", "memtui models inductor's min-cut partitioner",
                  lambda value: value != "inductor")
    reader.ignore("torch_compile_mode", "CUDA graphs keep a memory pool of their own, not modelled",
                  lambda value: value in ("reduce-overhead", "max-autotune"))

_STAGE_IN_NAME = re.compile(r"(?:zero[_-]?(?:stage)?[_-]?|(?<![a-z0-9])z|stage[_-]?)([0-3])(?![0-9])", re.IGNORECASE)


def _map_deepspeed(reader: _Reader, key: str, folder: Path) -> None:
    """DeepSpeed's JSON (a dict, a file beside the config, or a file name naming the stage): ZeRO stage and
    offload. deepspeed/runtime/zero/config.py: zero_optimization.stage, offload_optimizer/offload_param.device."""
    value = reader.get(key)
    if value is None or value == "":
        return
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else folder / path
        if path.is_file():
            value = read_json_file(path, f"{reader.source}: {key} ({value})")
        else:
            match = _STAGE_IN_NAME.search(Path(value).name)
            if match is None:
                reader.note(f"ignored: {key}={_shown(value)} (no such file here, and its name names no ZeRO "
                            "stage; give --zero)")
                return
            reader.set(key, "zero", int(match.group(1)))
            if "offload" in Path(value).name.lower():
                reader.set(key, "offload", "optimizer+params" if match.group(1) == "3" else "optimizer")
            return
    if not isinstance(value, Mapping):
        raise reader.error(key, f"{_quoted(value)} is neither a path nor a DeepSpeed config")
    zero = value.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else None
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise reader.error(f"{key}: zero_optimization.stage", f"{_quoted(stage)} is not a ZeRO stage", "0, 1, 2, 3")
    reader.set(key, "zero", stage)
    def offloaded(part: str) -> bool:
        section = zero.get(part)
        return isinstance(section, Mapping) and str(section.get("device", "none")).lower() in ("cpu", "nvme")

    if offloaded("offload_param"):
        reader.set(key, "offload", "optimizer+params")
    elif offloaded("offload_optimizer"):
        reader.set(key, "offload", "optimizer")


def _map_fsdp(reader: _Reader, key: str, config_key: str, implied: str | None = None) -> None:
    """transformers' `fsdp` option string or list (training_args.py, FSDPOption): full_shard/hybrid_shard = ZeRO-3,
    shard_grad_op = ZeRO-2; `offload` moves parameters and optimizer to the CPU."""
    value = reader.get(key) or implied
    if not value:
        return
    if value is True:
        value = "full_shard"  # Axolotl's `fsdp: true`
    if not isinstance(value, (str, list)):
        raise reader.error(key, f"{_quoted(value)} is not a list of FSDP options", "full_shard, shard_grad_op, offload")
    words = [str(word).lower() for word in (value.split() if isinstance(value, str) else value)]
    if "full_shard" in words or "hybrid_shard" in words:
        reader.set(key, "zero", 3)
    elif "shard_grad_op" in words or "hybrid_shard_zero2" in words:
        reader.set(key, "zero", 2)
    else:
        raise reader.error(key, f"{_quoted(value)} names no sharding strategy", "full_shard, shard_grad_op, hybrid_shard")
    # FSDP2 (fsdp_version: 2) keeps the gathered weights after forward with reshard_after_forward false: ZeRO-2.
    reshard = next((reader.get(f"{config_key}.{name}") for name in ("reshard_after_forward",
                                                                     "fsdp_reshard_after_forward")
                    if reader.has(f"{config_key}.{name}")), True)
    if reader.options["zero"] == 3 and str(reshard).lower() == "false":
        reader.set(f"{config_key}.reshard_after_forward", "zero", 2)
    if "offload" in words or reader.get(f"{config_key}.fsdp_offload_params") or reader.get(f"{config_key}.offload_params"):
        reader.set(key, "offload", "optimizer+params" if reader.options["zero"] == 3 else "optimizer")
    if reader.get(f"{config_key}.activation_checkpointing") or reader.get(f"{config_key}.fsdp_activation_checkpointing"):
        reader.set(f"{config_key}.activation_checkpointing", "checkpointing", "full")


# transformers' attn_implementation values (modeling_utils.py): sdpa and the flash kernels save no s x s scores.
_ATTENTION = {"eager": "eager", "sdpa": "flash", "flash_attention_2": "flash", "flash_attention_3": "flash",
              "flex_attention": "flash", "kernels-community/flash-attn": "flash"}
_TORCH_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "16", "fp16": "16", "half": "16",
                 "float32": "32", "fp32": "32", "float": "32", "auto": "auto"}


def _hf_precision(reader: _Reader, bf16_key: str, fp16_key: str, dtype_key: str | None) -> None:
    """bf16/fp16 are autocast (Trainer); a 16-bit torch_dtype loads the weights in 16 bits: memtui's *-true."""
    bf16, fp16 = reader.bool(bf16_key), reader.bool(fp16_key)
    if bf16 and fp16:
        raise reader.error(fp16_key, f"{fp16_key} and {bf16_key} are both on", "one of them")
    dtype = reader.choice(dtype_key, _TORCH_DTYPES) if dtype_key else None
    if dtype in ("bf16", "16"):
        reader.set(str(dtype_key), "precision", f"{dtype}-true")
        if dtype == "16" and bf16 or dtype == "bf16" and fp16:
            reader.note(f"ignored: {bf16_key if bf16 else fp16_key} (autocast to the other 16-bit type than "
                        f"{dtype_key}: modelled as {dtype_key} alone)")
    elif bf16:
        reader.set(bf16_key, "precision", "bf16-mixed")
    elif fp16:
        reader.set(fp16_key, "precision", "16-mixed")
    elif reader.has(bf16_key) or reader.has(fp16_key) or dtype == "32":
        reader.set(bf16_key, "precision", "32-true")


def _map_lora_targets(reader: _Reader, key: str) -> None:
    targets = reader.get(key)
    if targets is None:
        return
    if isinstance(targets, str):
        reader.set(key, "lora_targets", targets)  # a comma list, or peft's "all-linear"
    elif isinstance(targets, list) and targets and all(isinstance(item, str) for item in targets):
        reader.set(key, "lora_targets", ",".join(targets))
    else:
        raise reader.error(key, f"{_quoted(targets)} is not a list of layer names", "a list of linear layer names")


# ---- Hugging Face TrainingArguments / TRL SFTConfig + ModelConfig ----------------------------------------------
def _hugging_face(reader: _Reader, folder: Path) -> None:
    # transformers/src/transformers/training_args.py (TrainingArguments)
    reader.set("per_device_train_batch_size", "batch_size", reader.int("per_device_train_batch_size"))
    if reader.has("gradient_checkpointing"):
        reader.set("gradient_checkpointing", "checkpointing",
                   "full" if reader.bool("gradient_checkpointing") else "none")
    reader.ignore("gradient_checkpointing_kwargs.use_reentrant",
                  "memtui models the non-reentrant checkpoint transformers' trace runs", lambda value: value is True)
    # trl/trl/scripts/utils.py ModelConfig / trl/trl/trainer/model_config.py: torch_dtype (dtype in newer
    # releases), also inside SFTConfig.model_init_kwargs.
    dtype_key = next((key for key in ("torch_dtype", "dtype", "model_init_kwargs.torch_dtype",
                                      "model_init_kwargs.dtype") if reader.has(key)), None)
    _hf_precision(reader, "bf16", "fp16", dtype_key)
    if reader.has("optim"):
        _map_hf_optimizer(reader, "optim")
    # trl/trl/trainer/sft_config.py: max_length (max_seq_length before TRL 0.20)
    for key in ("max_length", "max_seq_length"):
        reader.set(key, "seq_len", reader.int(key))
    _map_deepspeed(reader, "deepspeed", folder)
    _map_fsdp(reader, "fsdp", "fsdp_config")
    attention = next((key for key in ("attn_implementation", "model_init_kwargs.attn_implementation")
                      if reader.has(key)), None)
    if attention:
        reader.set(attention, "attention", reader.choice(attention, _ATTENTION))
    # trl ModelConfig: use_peft, lora_r, lora_target_modules, load_in_4bit/8bit, bnb_4bit_quant_type
    if reader.bool("use_peft"):
        reader.set("lora_r", "lora_rank", reader.int("lora_r") or 16)  # ModelConfig.lora_r defaults to 16
        _map_lora_targets(reader, "lora_target_modules")
        reader.set("lora_dropout", "lora_dropout", _or_default(reader.number("lora_dropout"),
                                                               STACKS["trl"].value("lora_dropout")))  # ModelConfig's
    if reader.bool("load_in_4bit"):
        reader.set("load_in_4bit", "quant", "nf4")
        reader.ignore("bnb_4bit_quant_type", "fp4 has nf4's size; modelled as nf4", lambda value: value != "nf4")
    elif reader.bool("load_in_8bit"):
        reader.set("load_in_8bit", "quant", "int8")
    if reader.options.get("quant") and reader.bool("use_peft"):
        # trl/trainer/sft_trainer.py since huggingface/trl#4577 (TRL 0.26.0): no prepare_model_for_kbit_training;
        # a quantized model's trainable parameters (the adapters) are cast to bfloat16. The TRL stack's table.
        _framework_values(reader, "trl", "load_in_4bit" if reader.bool("load_in_4bit") else "load_in_8bit",
                          "lora_dtype", "kbit_prep")
    elif reader.bool("use_peft") and reader.has("deepspeed") and reader.options.get("zero") == 3:
        # trl/trainer/sft_trainer.py:1089-1096 (huggingface/trl#6091): under DeepSpeed ZeRO-3 an unquantized
        # model's adapters stay in its dtype (get_peft_model(..., autocast_adapter_dtype=False)).
        reader.set("deepspeed", "lora_dtype", "compute")
    _set_model(reader, "model_name_or_path", reader.text("model_name_or_path"))
    # transformers/training_args.py: gradient_accumulation_steps; use_liger_kernel patches the model's loss with
    # Liger's LigerFusedLinearCrossEntropy.
    reader.set("gradient_accumulation_steps", "grad_accum", reader.int("gradient_accumulation_steps"))
    _map_trainer_compile(reader)
    _map_fused_loss(reader, "use_liger_kernel")
    reader.ignore("padding_free", "padding-free batches: modelled as full sequences")


# ---- torchtune --------------------------------------------------------------------------------------------------
# torchtune/torchtune/models/<family>/_model_builders.py: builder names -> memtui presets.
_TORCHTUNE_MODELS = {
    "llama3_2_1b": "llama-3.2-1b", "llama3_2_3b": "llama-3.2-3b", "llama3_1_8b": "llama-3.1-8b",
    "llama3_1_70b": "llama-3.1-70b", "llama3_1_405b": "llama-3.1-405b", "mistral_7b": "mistral-7b",
    "qwen2_5_0_5b": "qwen2.5-0.5b", "qwen2_5_7b_base": "qwen2.5-7b", "qwen2_5_7b_instruct": "qwen2.5-7b",
    "qwen2_5_72b_instruct": "qwen2.5-72b", "gemma2_9b": "gemma-2-9b", "phi3_mini": "phi-3-mini",
}
# torchtune/torchtune/modules/peft/lora.py and the builders' lora_attn_modules: torchtune's layer names.
_TORCHTUNE_LAYERS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
_TORCH_OPTIMIZERS = {
    "torch.optim.adamw": "adamw", "torch.optim.adam": "adamw", "torch.optim.sgd": "sgd",
    "bitsandbytes.optim.adamw8bit": "adamw-8bit", "bitsandbytes.optim.pagedadamw8bit": "paged-adamw-8bit",
    "bitsandbytes.optim.pagedadamw": "paged-adamw", "bitsandbytes.optim.pagedadamw32bit": "paged-adamw",
    "torchao.optim.adamw8bit": "adamw-8bit", "torchao.prototype.low_bit_optim.adamw8bit": "adamw-8bit",
    "torch.optim.adafactor": "adafactor",
}
_TORCHTUNE_DTYPES = {"bf16": "bf16-true", "fp32": "32-true"}  # torchtune/training/precision.py PRECISION_STR_TO_DTYPE


def _torch_optimizer(reader: _Reader, key: str) -> None:
    """An optimizer named by its class path, with torch's fused/foreach/momentum arguments."""
    component = reader.text(key)
    if component is None:
        return
    optimizer = _TORCH_OPTIMIZERS.get(component.lower())
    if optimizer is None:
        raise reader.error(key, f"{_quoted(component)} is not an optimizer memtui can model",
                           ", ".join(sorted(_TORCH_OPTIMIZERS)))
    prefix = key.rsplit(".", 1)[0]
    momentum = reader.get(f"{prefix}.momentum") or reader.get(f"{prefix}.init_args.momentum")
    reader.set(key, "optimizer", "sgd-momentum" if optimizer == "sgd" and _positive(momentum) else optimizer)
    for args in (prefix, f"{prefix}.init_args"):
        if reader.bool(f"{args}.fused"):
            reader.set(f"{args}.fused", "optimizer_impl", "fused")
        elif reader.get(f"{args}.foreach") is False:
            reader.set(f"{args}.foreach", "optimizer_impl", "for-loop")


def _torchtune_output_adapter(reader: _Reader, builder: str) -> None:
    """torchtune's builders refuse apply_lora_to_output where the output projection is the embedding's
    (torchtune/models/llama3_2/_component_builders.py:261, qwen2/_component_builders.py:281: ValueError)."""
    model = reader.options.get("model")
    if model is not None and resolve_model(model).tie_word_embeddings:
        raise reader.error("model.apply_lora_to_output", f"torchtune's {builder} refuses it: {model}'s output "
                           "projection is tied to its embeddings", "false")


def _torchtune(reader: _Reader, _folder: Path) -> None:
    # torchtune/recipes/lora_finetune_single_device.py and full_finetune_*.py read these keys.
    component = reader.text("model._component_") or ""
    builder = component.rsplit(".", 1)[-1]
    quantized = builder.startswith("qlora_") or reader.bool("model.quantize_base") is True
    base = re.sub(r"^q?lora_", "", builder)
    if base in _TORCHTUNE_MODELS:
        reader.options["model"] = _TORCHTUNE_MODELS[base]
    else:
        reader.note(f"model not set: model._component_={component} is not a memtui preset; give --model")
    if builder.startswith(("lora_", "qlora_")):
        reader.set("model.lora_rank", "lora_rank", reader.int("model.lora_rank") or 8)  # the builders' default
        modules = reader.get("model.lora_attn_modules") or []
        if not isinstance(modules, list) or any(name not in _TORCHTUNE_LAYERS for name in modules):
            raise reader.error("model.lora_attn_modules", f"{_quoted(modules)} names a layer torchtune does not have",
                               ", ".join(_TORCHTUNE_LAYERS))
        targets = [_TORCHTUNE_LAYERS[name] for name in modules]
        if reader.bool("model.apply_lora_to_mlp"):
            targets += ["gate_proj", "down_proj", "up_proj"]  # torchtune's w1, w2, w3
        if reader.bool("model.apply_lora_to_output"):
            _torchtune_output_adapter(reader, builder)
            targets.append(HEAD_TARGET)  # the output projection becomes a LoRALinear: memtui's lm_head target
        if targets:
            reader.set("model.lora_attn_modules", "lora_targets", ",".join(targets))
        reader.set("model.lora_dropout", "lora_dropout", reader.number("model.lora_dropout"))  # builders: 0.0
        reader.options["lora_dtype"] = STACKS["torchtune"].value("lora_dtype")  # LoRALinear: the model's dtype
        if quantized:
            reader.options["quant"] = "nf4"  # torchao's NF4Tensor, the same 4-bit blocks as bitsandbytes' nf4
    reader.set("batch_size", "batch_size", reader.int("batch_size"))
    reader.set("dtype", "precision", reader.choice("dtype", _TORCHTUNE_DTYPES))
    if reader.has("enable_activation_checkpointing"):
        reader.set("enable_activation_checkpointing", "checkpointing",
                   "full" if reader.bool("enable_activation_checkpointing") else "none")
    _torch_optimizer(reader, "optimizer._component_")
    seq_len = reader.int("tokenizer.max_seq_len")
    if seq_len is None:
        reader.note("seq_len not set: tokenizer.max_seq_len is null, so the dataset's longest sample decides it; "
                    "give --seq-len")
    reader.set("tokenizer.max_seq_len", "seq_len", seq_len)
    # The distributed recipes shard with FSDP2 fully_shard (torchtune/training/_distributed.py shard_model).
    if any(reader.has(key) for key in ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "data_parallel_shard_dim")):
        reshard = reader.get("fsdp_reshard_after_forward", True)
        reader.set("fsdp_reshard_after_forward", "zero", 3 if reshard else 2)
        if reader.bool("fsdp_cpu_offload"):
            reader.set("fsdp_cpu_offload", "offload", "optimizer+params" if reshard else "optimizer")
    reader.set("tensor_parallel_dim", "tp", reader.int("tensor_parallel_dim"))
    reader.set("gradient_accumulation_steps", "grad_accum", reader.int("gradient_accumulation_steps"))
    # recipes/full_finetune_single_device.py: optimizer_in_bwd steps each parameter in a post-accumulate-grad hook.
    if reader.bool("optimizer_in_bwd"):
        reader.set("optimizer_in_bwd", "optimizer_in_backward", True)
    # recipes/*: enable_activation_offloading wraps the model's forward in OffloadActivations.
    if reader.bool("enable_activation_offloading"):
        reader.set("enable_activation_offloading", "activation_offload", True)
    # torchtune/training/_compile.py: compile_model compiles each TransformerSelfAttentionLayer, as memtui does;
    # compile_loss compiles the loss too (the recipes' `compile`, False in the shipped configs), as memtui does;
    # a whole-module loss only where the recipe keeps its result (below).
    _map_compile(reader, "compile", "")
    # torchtune/modules/loss: CEWithChunkedOutputLoss (num_output_chunks, 8) and LinearCrossEntropyLoss (the
    # output projection inside the loss, chunked).
    loss = str(reader.get("loss._component_", "")).lower()
    if "chunked" in loss:
        reader.set("loss._component_", "loss", "chunked")
        reader.set("loss.num_output_chunks", "loss_chunks",
                   reader.int("loss.num_output_chunks") or STACKS["torchtune"].value("loss_chunks"))
    elif "linearcrossentropy" in loss:
        # The loss projects each chunk through the model's output and upcasts it (cross_entropy(logits.float())):
        # one chunk's compute-dtype logits at a time, every chunk's fp32 log-probabilities kept for backward. The
        # chunked loss, which keeps every chunk's compute-dtype logits as well, stands in, as for --stack torchtune
        # (the fused-linear loss would keep neither: an under-estimate of the fp32 log-probabilities).
        if reader.options.get("gpus", 1) > 1:
            reader.note("ignored: loss._component_=LinearCrossEntropyLoss (memtui models the chunked loss on one "
                        "GPU only)")
        else:
            reader.set("loss._component_", "loss", "chunked")
            reader.set("loss.num_output_chunks", "loss_chunks",
                       reader.int("loss.num_output_chunks") or STACKS["torchtune"].value("loss_chunks"))
            through = " through the LoRA output projection" if HEAD_TARGET in reader.options.get("lora_targets", "").split(",") else ""
            reader.note(f"loss._component_: LinearCrossEntropyLoss{through} is modelled as --loss chunked, which "
                        "keeps every chunk's compute-dtype logits (torchtune keeps one at a time), as --stack "
                        "torchtune does")
    if reader.options.get("loss", "standard") == "standard":
        # A whole (non-chunked) output: TransformerDecoder returns self.output(h).float(), fp32 logits the loss
        # takes as they are, as --stack torchtune says.
        reader.set("loss._component_", "logits_upcast", STACKS["torchtune"].value("logits_upcast"))
        if reader.bool("compile"):
            # compile_loss returns torch.compile(loss) for a whole-module loss; only lora_finetune_single_device
            # keeps it (self._loss_fn = ...), full_finetune_* and lora_finetune_distributed drop it (at 1814feb17
            # and bd2a0fc7c), and the file does not say which recipe runs it.
            reader.note("compile: torchtune's full_finetune_* and lora_finetune_distributed recipes drop "
                        "compile_loss's compiled copy of a whole-module loss, which then stays eager: add "
                        "--eager-loss for them (lora_finetune_single_device compiles it)")


# ---- LitGPT -------------------------------------------------------------------------------------------------------
# litgpt/litgpt/finetune/lora.py setup(): the LoRA switches per projection; the model's fused qkv is split into
# the three names memtui knows.
_LITGPT_LORA = {"lora_query": ("q_proj",), "lora_key": ("k_proj",), "lora_value": ("v_proj",),
                "lora_projection": ("o_proj",), "lora_mlp": ("gate_proj", "up_proj", "down_proj")}
_LITGPT_PRECISIONS = {value: value for value in ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")}
_LITGPT_PRECISIONS.update({"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true"})
# litgpt/litgpt/utils.py: quantize values (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8-training)
_LITGPT_QUANT = {"bnb.nf4": "nf4", "bnb.nf4-dq": "nf4", "bnb.fp4": "nf4", "bnb.fp4-dq": "nf4",
                 "bnb.int8-training": "int8"}


def _litgpt(reader: _Reader, _folder: Path) -> None:
    checkpoint = reader.text("checkpoint_dir")
    if checkpoint:
        _set_model(reader, "checkpoint_dir", checkpoint)
    reader.set("precision", "precision", reader.choice("precision", _LITGPT_PRECISIONS))
    reader.set("quantize", "quant", reader.choice("quantize", _LITGPT_QUANT))
    reader.ignore("quantize", "fp4 has nf4's size and double quantization saves ~0.4 bits/weight; modelled as nf4",
                  lambda value: value in ("bnb.fp4", "bnb.fp4-dq", "bnb.nf4-dq"))
    # litgpt/litgpt/args.py TrainArgs: micro_batch_size, max_seq_length (top-level max_seq_length in old configs)
    reader.set("train.micro_batch_size", "batch_size", reader.int("train.micro_batch_size"))
    for key in ("train.max_seq_length", "max_seq_length"):
        reader.set(key, "seq_len", reader.int(key))
    if reader.has("lora_r"):
        reader.set("lora_r", "lora_rank", reader.int("lora_r"))
        targets = [name for key, names in _LITGPT_LORA.items() if reader.bool(key) for name in names]
        if reader.bool("lora_head"):
            targets.append(HEAD_TARGET)  # litgpt/lora.py: lm_head becomes a LoRALinear (memtui's lm_head target)
        if targets:
            reader.set("lora_query", "lora_targets", ",".join(targets))
        # litgpt/finetune/lora.py setup(): lora_dropout=0.05; litgpt/lora.py keeps adapters in the model's dtype.
        reader.set("lora_dropout", "lora_dropout", _or_default(reader.number("lora_dropout"),
                                                               STACKS["litgpt"].value("lora_dropout")))
        reader.options["lora_dtype"] = STACKS["litgpt"].value("lora_dtype")
    devices = reader.get("devices", 1)
    nodes = reader.int("num_nodes") or 1
    if isinstance(devices, int) and not isinstance(devices, bool):
        devices = reader.int("devices")
        gpus = (devices or 1) * nodes
        reader.set("devices", "gpus", gpus)
        if gpus > 1:
            # lora.py/full.py: FSDPStrategy(activation_checkpointing_policy={Block}) when more than one device.
            reader.set("devices", "zero", 3)
            reader.set("devices", "checkpointing", "full")
    elif devices == "auto":
        reader.note("gpus not set: devices=auto (every visible GPU; more than one runs FSDP with each block "
                    "checkpointed); give --gpus, --zero 3 --checkpointing full")
    else:
        raise reader.error("devices", f"{_quoted(devices)} is not a device count", "a whole number, auto")
    if reader.has("lora_r"):
        _litgpt_loss(reader)
    optimizer = reader.get("optimizer")
    if isinstance(optimizer, str):
        reader.set("optimizer", "optimizer", reader.choice("optimizer", {"adamw": "adamw", "adam": "adamw",
                                                                          "sgd": "sgd"}))
    elif isinstance(optimizer, Mapping):
        _torch_optimizer(reader, "optimizer.class_path")
    micro, global_batch = reader.get("train.micro_batch_size", 1), reader.get("train.global_batch_size")
    # litgpt/finetune/lora.py: accumulation steps = global_batch_size // (devices x num_nodes) // micro_batch_size
    if _positive(global_batch) and _positive(micro) and global_batch > micro * reader.options.get("gpus", 1):
        reader.set("train.global_batch_size", "grad_accum", global_batch // reader.options.get("gpus", 1) // micro)
    _litgpt_modeling(reader)


def _litgpt_modeling(reader: _Reader) -> None:
    """litgpt finetune runs LitGPT's own GPT (litgpt/lora.py): --modeling litgpt where memtui models it with the
    options read, else transformers' model stands in, said in a note."""
    view = {**{name: field.default for name, field in TrainingConfig.model_fields.items()}, **reader.options}
    if litgpt_modelled(view):
        reader.options["modeling"] = "litgpt"
    else:
        reader.note("LitGPT's GPT (--modeling litgpt) is modelled for untied Llama/Mistral configs on one GPU, "
                    "unquantized, bf16-true or 16-true, with its chunked head and loss: transformers' model here")
        if reader.options.get("lora_rank"):
            reader.note("LitGPT adapts slices of its fused qkv projection; transformers' model has separate q/k/v "
                        "projections")


# litgpt/finetune/lora.py fit(): model(input_ids, lm_head_chunk_size=128), then chunked_cross_entropy (litgpt/utils.py)
# on the chunks as they are, in the logits' dtype.
_LITGPT_HEAD_CHUNK = 128


def _litgpt_loss(reader: _Reader) -> None:
    seq_len = reader.options.get("seq_len", TrainingConfig.model_fields["seq_len"].default)
    most = next(item.le for item in TrainingConfig.model_fields["loss_chunks"].metadata if getattr(item, "le", None))
    chunks = min(-(-seq_len // _LITGPT_HEAD_CHUNK), most)
    if reader.options.get("gpus", 1) > 1:
        reader.note("LitGPT's chunked head and compute-dtype loss are modelled on one GPU: standard loss here")
        return
    reader.options.update(loss="chunked", loss_chunks=chunks, loss_dtype="compute")
    reader.note(f"LitGPT's head runs in chunks of {_LITGPT_HEAD_CHUNK} tokens: --loss-chunks {chunks} for "
                f"{seq_len} tokens (give --loss-chunks with another --seq-len)")


# ---- torchtitan ----------------------------------------------------------------------------------------------------
# torchtitan/torchtitan/models/llama3/__init__.py llama3_configs: flavors of the Llama 3.1 architecture.
_TORCHTITAN_MODELS = {("llama3", "8b"): "llama-3.1-8b", ("llama3", "70b"): "llama-3.1-70b",
                      ("llama3", "405b"): "llama-3.1-405b"}
# Training.mixed_precision_param: applied by fully_shard when sharded (--fsdp-param-dtype compute), by torch.autocast
# under DDP or on one GPU.
_TITAN_DTYPES = {"bfloat16": "bf16-mixed", "float32": "32-true"}


def _torchtitan(reader: _Reader, _folder: Path) -> None:
    """torchtitan/torchtitan/config/job_config.py (JobConfig): the sections and keys below, and the defaults
    torchtitan itself applies to a key the TOML leaves out (a run without it runs with them)."""
    name, flavor = reader.text("model.name"), reader.text("model.flavor")
    if name:
        preset = _TORCHTITAN_MODELS.get((name.lower(), str(flavor).lower()))
        if preset:
            reader.options["model"] = preset
        else:
            reader.note(f"model not set: model.name={name} model.flavor={flavor} is not a memtui preset; give --model")
    titan = STACKS["torchtitan"]
    reader.set("training.local_batch_size", "batch_size",
               reader.int("training.local_batch_size") or reader.int("training.batch_size")
               or titan.value("batch_size"))
    reader.set("training.seq_len", "seq_len", reader.int("training.seq_len") or titan.value("seq_len"))
    defaults = {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1, "tensor_parallel_degree": 1,
                "pipeline_parallel_degree": 1, "context_parallel_degree": 1}
    degrees = {key: reader.get(f"parallelism.{key}", default) for key, default in defaults.items()}
    for key, value in degrees.items():
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise reader.error(f"parallelism.{key}", f"{_quoted(value)} is not a degree", "-1 or whole numbers from 1")
    reader.set("parallelism.tensor_parallel_degree", "tp", degrees["tensor_parallel_degree"])
    reader.set("parallelism.pipeline_parallel_degree", "pp", degrees["pipeline_parallel_degree"])
    if degrees["pipeline_parallel_degree"] > 1:
        # torchtitan's pipelining: the schedule by torch's class name, the local batch in micro-batches of
        # pipeline_parallel_microbatch_size sequences (its default 1).
        schedules = {"1f1b": "1f1b", "gpipe": "gpipe", "interleaved1f1b": "interleaved-1f1b"}
        reader.set("parallelism.pipeline_parallel_schedule", "pp_schedule",
                   reader.choice("parallelism.pipeline_parallel_schedule", schedules) or "1f1b")
        size = reader.int("parallelism.pipeline_parallel_microbatch_size") or 1
        batch = reader.options.get("batch_size", 1)
        if batch % size:
            raise reader.error("parallelism.pipeline_parallel_microbatch_size",
                               f"{size} does not divide training.local_batch_size {batch}")
        reader.set("parallelism.pipeline_parallel_microbatch_size", "microbatches", batch // size)
    shard = degrees["data_parallel_shard_degree"]
    if -1 in degrees.values():
        reader.note("gpus not set: parallelism.data_parallel_shard_degree is -1 (the ranks left over), so the "
                    "world size is not in the file; give --gpus")
    else:
        product = 1
        for value in degrees.values():
            product *= value
        reader.set("parallelism", "gpus", product)
    if shard == -1 or shard > 1:
        # parallelize.py apply_fsdp: fully_shard, reshard_after_forward per fsdp_reshard_after_forward.
        reshard = reader.choice("parallelism.fsdp_reshard_after_forward",
                                {"default": True, "always": True, "never": False})
        reader.set("parallelism.data_parallel_shard_degree", "zero", 2 if reshard is False else 3)
        if reader.bool("training.enable_cpu_offload"):  # FSDP's CPUOffloadPolicy: weights, gradients, optimizer
            reader.set("training.enable_cpu_offload", "offload", "optimizer+params" if reshard is not False
                       else "optimizer")
    elif degrees["data_parallel_replicate_degree"] > 1:
        reader.set("parallelism.data_parallel_replicate_degree", "zero", 0)  # DDP
    reader.set("training.mixed_precision_param", "precision",
               reader.choice("training.mixed_precision_param", _TITAN_DTYPES) or titan.value("precision"))
    reader.ignore("parallelism.context_parallel_degree", "context parallelism is not modelled", _more_than_one)
    reader.ignore("parallelism.expert_parallel_degree", "expert parallelism is not modelled", _more_than_one)
    modes = {"none": "none", "selective": "selective", "full": "full"}
    mode = reader.choice("activation_checkpoint.mode", modes) or titan.value("checkpointing")
    option = str(reader.get("activation_checkpoint.selective_ac_option", "2"))
    if mode == "selective" and option == "op":  # torchtitan's op-level policy: --checkpointing selective-op
        mode = "selective-op"
    reader.set("activation_checkpoint.mode", "checkpointing", mode)
    if mode == "selective":
        reader.note(f"activation_checkpoint.mode=selective (selective_ac_option={option}: one layer in {option} "
                    "fully checkpointed) is not modelled: approximated by memtui's selective checkpointing")
    reader.set("optimizer.name", "optimizer", reader.choice("optimizer.name", {"adamw": "adamw", "adam": "adamw"}))
    impl = reader.choice("optimizer.implementation", {"foreach": "foreach", "fused": "fused", "for-loop": "for-loop"})
    reader.set("optimizer.implementation", "optimizer_impl", impl or titan.value("optimizer_impl"))
    if reader.bool("optimizer.early_step_in_backward"):
        if reader.options.get("zero", 0):
            reader.note("ignored: optimizer.early_step_in_backward=true (memtui models stepping in backward on "
                        "unsharded parameters only)")
        else:
            reader.set("optimizer.early_step_in_backward", "optimizer_in_backward", True)
    # job_config.py Compile: enable (False), components (["model", "loss"]); parallelize.py apply_compile compiles
    # each TransformerBlock, as memtui does, and components/loss.py the loss. Before [compile], training.compile.
    components = reader.get("compile.components", ["model", "loss"])
    if not isinstance(components, list) or any(not isinstance(name, str) for name in components):
        raise reader.error("compile.components", f"{_quoted(components)} is not a list of names", "model, loss")
    if "model" in components:
        _map_compile(reader, "compile.enable", "")
        if reader.bool("compile.enable") and "loss" not in components:
            reader.set("compile.components", "eager_loss", True)  # the layers alone, the loss eager
    elif reader.bool("compile.enable"):
        reader.note("ignored: compile.enable=true (compile.components leaves out the model: only the loss is "
                    "compiled, which memtui's --compile does only with the layers)")
    _map_compile(reader, "training.compile", "")
    # global_batch_size above local_batch_size x the data-parallel degree accumulates gradients (train.py).
    data_parallel = degrees["data_parallel_replicate_degree"] * shard
    global_batch = reader.get("training.global_batch_size")
    if _positive(global_batch) and data_parallel > 0:
        reader.set("training.global_batch_size", "grad_accum",
                   max(1, global_batch // (reader.options["batch_size"] * data_parallel)))
    else:
        reader.ignore("training.global_batch_size", "the data-parallel degree is not known, so neither is the "
                      "gradient accumulation", _positive)
    _torchtitan_float8(reader)
    # Under FSDP mixed_precision_param is fully_shard's MixedPrecisionPolicy(param_dtype), not autocast.
    _framework_values(reader, "torchtitan", "training.mixed_precision_param", "fsdp_param_dtype")


def _torchtitan_float8(reader: _Reader) -> None:
    """torchtitan's float8 converter: `model.converters = ["float8"]` (or, before converters,
    `float8.enable_float8_linear = true`) swaps every nn.Linear but the output head for torchao's Float8Linear;
    `float8.recipe_name` unset is tensorwise scaling (Float8LinearConfig's default)."""
    converters = reader.get("model.converters")
    if converters is not None and not isinstance(converters, list):
        raise reader.error("model.converters", f"{_quoted(converters)} is not a list of converter names")
    names = [str(name) for name in converters or []]
    enabled = "float8" in names or bool(reader.bool("float8.enable_float8_linear"))
    others = [name for name in names if name != "float8"]
    if others:
        reader.note(f"ignored: model.converters={_shown(others)} (only the float8 converter is modelled)")
    if not enabled:
        return
    recipe = reader.choice("float8.recipe_name", {"tensorwise": "tensorwise"}) or "tensorwise"
    reader.set("model.converters" if "float8" in names else "float8.enable_float8_linear", "float8", recipe)
    reader.ignore("float8.enable_fsdp_float8_all_gather", "FSDP2's float8 all-gather is not modelled: the layers "
                  "are gathered in bf16 and cast to float8 in each matmul")
    reader.ignore("float8.precompute_float8_dynamic_scale_for_fsdp", "goes with the float8 all-gather, not modelled")
    reader.ignore("float8.filter_fqns", "memtui converts every decoder linear whose dimensions divide by 16",
                  lambda value: bool([name for name in value or [] if name != "output"]))


# ---- Axolotl -------------------------------------------------------------------------------------------------------
def _axolotl(reader: _Reader, folder: Path) -> None:
    # axolotl/src/axolotl/utils/schemas/config.py (AxolotlInputConfig) and its mixins define these keys.
    _set_model(reader, "base_model", reader.text("base_model"))
    reader.set("micro_batch_size", "batch_size", reader.int("micro_batch_size"))
    reader.set("sequence_len", "seq_len", reader.int("sequence_len"))
    # normalize_config (axolotl/utils/config/__init__.py): bf16 or bfloat16 -> torch_dtype bfloat16; else
    # load_in_8bit, fp16 or float16 -> float16; else float32. The weights are loaded in that dtype, with the
    # Trainer's autocast on top.
    bf16 = reader.get("bf16")
    if bf16 is True or bf16 == "auto" or reader.bool("bfloat16"):
        reader.set("bf16", "precision", "bf16-true")
    elif reader.bool("fp16") or reader.bool("float16") or reader.bool("load_in_8bit"):
        reader.set("fp16", "precision", "16-true")
    elif reader.bool("load_in_4bit") or reader.get("adapter") == "qlora":
        reader.note("precision not set: a 4-bit base with float32 weights elsewhere is not modelled; give "
                    "--precision")
    else:
        reader.set("bf16", "precision", "32-true")
    gradient_checkpointing = reader.get("gradient_checkpointing")
    if gradient_checkpointing is not None:
        reader.set("gradient_checkpointing", "checkpointing", "none" if gradient_checkpointing is False else "full")
        reader.ignore("gradient_checkpointing", "checkpoints offloaded to the CPU are not modelled yet",
                      lambda value: isinstance(value, str) and value.startswith("offload"))
    if reader.bool("eager_attention"):
        reader.set("eager_attention", "attention", "eager")
    elif any(reader.bool(key) for key in ("flash_attention", "sdp_attention", "xformers_attention",
                                          "flex_attention")):
        reader.set("flash_attention", "attention", "flash")
    adapter = reader.choice("adapter", {"lora": "lora", "qlora": "qlora"})
    if adapter:
        reader.set("lora_r", "lora_rank", reader.int("lora_r") or 8)  # lora_r defaults to 8 (schemas/peft.py)
        if reader.bool("lora_target_linear"):
            reader.set("lora_target_linear", "lora_targets", "all-linear")
        else:
            _map_lora_targets(reader, "lora_target_modules")
        reader.set("lora_dropout", "lora_dropout", reader.number("lora_dropout"))  # schemas/peft.py: 0.0
    if reader.bool("load_in_4bit") or adapter == "qlora":
        reader.set("load_in_4bit", "quant", "nf4")
    elif reader.bool("load_in_8bit"):
        reader.set("load_in_8bit", "quant", "int8")
    if adapter and reader.options.get("quant"):
        # loaders/model.py: peft's prepare_model_for_kbit_training, then the norms, embeddings and head cast back
        # to the load dtype (_configure_embedding_dtypes). The Axolotl stack's table.
        _framework_values(reader, "axolotl", "adapter", "kbit_prep")
    if reader.has("optimizer"):
        _map_hf_optimizer(reader, "optimizer")  # the Trainer's optim names, passed through
    _map_deepspeed(reader, "deepspeed", folder)
    # Axolotl's FSDP2 configs give fsdp_config (fsdp_version: 2) alone: fully sharded.
    _map_fsdp(reader, "fsdp", "fsdp_config", implied="full_shard" if reader.has("fsdp_config") else None)
    reader.set("gradient_accumulation_steps", "grad_accum", reader.int("gradient_accumulation_steps"))
    # schemas/config.py: torch_compile (None; "auto" is true with torch >= 2.5.1), handed to TrainingArguments.
    _map_trainer_compile(reader, axolotl=True)
    _map_fused_loss(reader, "liger_fused_linear_cross_entropy")
    _map_fused_loss(reader, "cut_cross_entropy", "modelled with Liger's allocations; cut-cross-entropy's kernel "
                    "keeps less")
    # Axolotl's activation_offloading: true wraps the forward in torchtune's OffloadActivations (its port).
    if reader.get("activation_offloading") is True:
        reader.set("activation_offloading", "activation_offload", True)
    reader.ignore("activation_offloading", "Axolotl's legacy/disk offloading is not modelled",
                  lambda value: isinstance(value, str))
    reader.ignore("unsloth_lora_mlp", "Unsloth's fused LoRA kernels are not modelled")


_MAPPERS: dict[str, Callable[[_Reader, Path], None]] = {
    "hf": _hugging_face, "torchtune": _torchtune, "litgpt": _litgpt, "torchtitan": _torchtitan,
    "axolotl": _axolotl,
}
_HF_KEYS = ("per_device_train_batch_size", "output_dir", "optim", "gradient_checkpointing", "model_name_or_path",
            "max_seq_length", "max_length", "learning_rate")
_AXOLOTL_KEYS = ("base_model", "micro_batch_size", "sequence_len", "adapter", "lora_target_linear")
_LITGPT_KEYS = ("checkpoint_dir", "lora_query")  # with a `train:` section, LitGPT's own


def detect_format(data: Mapping[str, Any], suffix: str) -> str | None:
    """Which framework wrote this config, from its extension and its keys; None when none of the five did."""
    if suffix == ".toml":
        return "torchtitan" if any(key in data for key in ("training", "parallelism", "model", "job")) else None
    model = data.get("model")
    if isinstance(model, Mapping) and "_component_" in model:
        return "torchtune"
    if any(key in data for key in _AXOLOTL_KEYS):
        return "axolotl"
    if isinstance(data.get("train"), Mapping) or any(key in data for key in _LITGPT_KEYS):
        return "litgpt"
    if any(key in data for key in _HF_KEYS):
        return "hf"
    return None


def _parse(path: Path, source: str) -> Any:
    if path.is_dir():  # os.fdopen refuses a folder with an OSError of its own
        raise InputError(source, "not a regular file; give the path of a training config file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_json_file(path, source)
    text = _read_config_text(path, source)
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise InputError(source, f"malformed TOML: {error}") from None
    import yaml  # imported here: only --from FILE needs it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "not YAML"
        raise InputError(source, f"malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise InputError(source, "nested too deeply") from None


def read_framework_config(path: str | Path) -> FrameworkConfig:
    """The file's memory-relevant keys as TrainingConfig fields, and notes for those memtui cannot express."""
    path = Path(path)
    source = str(path)
    data = _parse(path, source)
    if not isinstance(data, Mapping):
        raise InputError(source, "not a training config: the top level is not a mapping of keys")
    kind = detect_format(data, path.suffix.lower())
    if kind is None:
        raise InputError(source, "not a training config memtui reads", ", ".join(FORMAT_NAMES.values()))
    reader = _Reader(source, data)
    _MAPPERS[kind](reader, path.parent)
    if reader.options.get("zero") and "gpus" not in reader.options:
        reader.note(f"gpus not set: the {FORMAT_NAMES[kind]} does not say how many GPUs shard it; give --gpus")
    return FrameworkConfig(source, kind, dict(reader.options),
                           (f"from {path.name} ({FORMAT_NAMES[kind]})", *reader.notes))


__all__ = ["FORMATS", "FORMAT_NAMES", "FrameworkConfig", "detect_format", "preset_for_name", "read_framework_config"]
