"""From a Hugging Face config.json to the architecture facts the estimator needs.

Every supported family is described by what its transformers implementation
actually builds: which linear layers a decoder layer has (names as in the
module tree, so LoRA targets match peft's), which norms, whether the MLP is
gated, and how embeddings and the output head are laid out. Parameter counts
follow from that and equal the released checkpoints'.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from memtui.engine.errors import InputError

Family = Literal[
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "mixtral", "olmo2", "gemma3", "qwen3_moe",
    "gpt_oss", "deepseek_v3",
    "generic",
]

# model_type in config.json -> family; the family decides the layer layout.
SUPPORTED_MODEL_TYPES: dict[str, Family] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "mixtral": "mixtral",
    "olmo2": "olmo2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # the multimodal config: its text_config (see _text_config)
    "qwen3_moe": "qwen3_moe",
    "gpt_oss": "gpt_oss",
    "deepseek_v3": "deepseek_v3",
}

# The HF class a family trains with.
CAUSAL_LM_CLASS: dict[Family, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "mixtral": "MixtralForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

# Families whose decoder layers normalise queries and keys (q_norm, k_norm).
QK_NORM_FAMILIES = ("qwen3", "olmo2", "gemma3", "qwen3_moe")
# Families with Gemma's scaled embeddings, (1 + weight) RMSNorm and GELU (tanh) MLP.
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
# Families with mixture-of-experts MLPs (experts stored as stacked 3D tensors).
MOE_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")
# Families transformers trains with eager attention whatever is asked: GptOss declares no SDPA support (SDPA
# would drop its attention sinks), so transformers' default falls back to eager, which the OpenAI cookbook's
# fine-tune also sets; FlashAttention with sinks comes only from a Hub kernel (kernels-community/vllm-flash-attn3).
EAGER_ONLY_FAMILIES = ("gpt_oss",)

# Gemma3TextConfig's defaults (transformers): a multimodal Gemma 3 config.json's text_config names only
# what differs from them.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "attention_bias": False, "attention_dropout": 0.0,
}


class LinearLayer(BaseModel):
    """One weight matrix inside a decoder layer (per expert when experts > 1)."""

    model_config = ConfigDict(frozen=True)

    name: str
    in_features: int
    out_features: int
    bias: bool
    experts: int = 1  # >1: stored as one 3D tensor of this many experts

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.experts

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features * self.experts if self.bias else 0)


class ModelSpec(BaseModel):
    """A decoder-only transformer, as far as memory is concerned."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    family: Family
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    hidden_act: str
    norm: Literal["rms", "layer"]
    norms_per_layer: int
    positions: Literal["rope", "learned"]
    max_position_embeddings: int
    num_experts: int = 0
    experts_per_token: int = 0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    qk_norm: bool = False
    qk_norm_widths: tuple[int, int] = (0, 0)  # q_norm and k_norm weights (head_dim each; OLMo 2: q_dim, kv_dim)
    notes: tuple[str, ...] = ()  # what memtui changed while reading the config.json
    linears: tuple[LinearLayer, ...]
    # DeepSeek-V3: the first `dense_layers` decoder layers have a dense MLP (`dense_linears`), the others `linears`.
    dense_layers: int = 0
    dense_linears: tuple[LinearLayer, ...] = ()
    source: str = ""
    config: dict[str, Any]

    # ---- derived counts -------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def norm_params(self) -> int:
        """Parameters of one norm (LayerNorm has a bias)."""
        return self.hidden_size * (2 if self.norm == "layer" else 1)

    @property
    def qk_norm_params(self) -> int:
        return sum(self.qk_norm_widths) if self.qk_norm else 0

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden_size if self.is_moe else 0

    @property
    def layer_vectors(self) -> tuple[int, ...]:
        """Per-layer parameter vectors besides biases and norms: gpt-oss's router bias and attention sinks."""
        return (self.num_experts, self.num_heads) if self.family == "gpt_oss" else ()

    @property
    def layer_linear_params(self) -> int:
        return sum(linear.params for linear in self.linears)

    @property
    def layer_params(self) -> int:
        return (
            self.layer_linear_params
            + self.norms_per_layer * self.norm_params
            + self.qk_norm_params
            + self.router_params
            + sum(self.layer_vectors)
        )

    def layer_groups(self, layers: int | None = None) -> tuple[tuple[int, tuple[LinearLayer, ...]], ...]:
        """(how many, their linears) of each kind among the first `layers` decoder layers (all by default), in
        order: DeepSeek-V3's leading dense layers, then the others."""
        layers = self.num_layers if layers is None else layers
        dense = min(self.dense_layers, layers)
        groups = ((dense, self.dense_linears),) if dense else ()
        return groups + (((layers - dense, self.linears),) if layers > dense else ())

    def group_layer_params(self, linears: tuple[LinearLayer, ...]) -> int:
        """Parameters of one decoder layer with these linears (the router only beside stacked experts)."""
        routed = any(linear.experts > 1 for linear in linears)
        return (sum(linear.params for linear in linears) + self.norms_per_layer * self.norm_params
                + self.qk_norm_params + (self.router_params if routed else 0) + sum(self.layer_vectors))

    @property
    def embedding_params(self) -> int:
        position = self.max_position_embeddings * self.hidden_size if self.positions == "learned" else 0
        return self.vocab_size * self.hidden_size + position

    @property
    def head_params(self) -> int:
        """lm_head parameters that are not shared with the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        if self.family == "generic" and "params" in self.config.get("_memtui", {}):
            return self.config["_memtui"]["params"]  # counted on the built module (memtui.engine.model.generic)
        return (
            self.embedding_params
            + sum(count * self.group_layer_params(linears) for count, linears in self.layer_groups())
            + self.norm_params  # final norm
            + self.head_params
        )

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(linear.name for linear in self.linears)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def linear(self, name: str) -> LinearLayer:
        for linear in self.linears:
            if linear.name == name:
                return linear
        raise KeyError(name)

    def hf_config(self) -> dict[str, Any]:
        """The config.json dict, without memtui's own metadata."""
        return {key: value for key, value in self.config.items() if key != "_memtui"}


# ---- reading a config.json ------------------------------------------------------
MAX_CONFIG_BYTES = 4 * 2**20  # released config.json files are a few KiB; a vocabulary-sized id2label stays below
MAX_NESTING = 32  # a config is a few levels deep; deeper is not a config (and recursion-bound code downstream)
MAX_INTEGER_DIGITS = 18  # token ids and sizes fit in an int64; longer literals are not sizes


class _UnusableNumber(str):
    """A JSON number no config holds (NaN, Infinity, a 5000-digit integer), kept to be reported with its key."""

    reason: str

    def __new__(cls, text: str, reason: str) -> _UnusableNumber:
        number = super().__new__(cls, text)
        number.reason = reason
        return number


def _parse_int(text: str) -> int | _UnusableNumber:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        return _UnusableNumber(text, f"an integer of {digits} digits is not a size")
    return int(text)


def _parse_float(text: str) -> float | _UnusableNumber:
    value = float(text)
    return value if math.isfinite(value) else _UnusableNumber(text, f"{text[:24]} overflows to infinity")


def _parse_constant(text: str) -> _UnusableNumber:
    return _UnusableNumber(text, f"{text} is not a number a config can hold")


def _read_config_text(path: Path, source: str) -> str:
    """The file's text: a regular file only (a pipe would block, /dev/zero never ends), at most MAX_CONFIG_BYTES."""
    try:
        # O_NONBLOCK: opening a named pipe returns at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(source, "no such file") from None
    except (OSError, ValueError) as error:
        raise InputError(source, f"cannot read: {getattr(error, 'strerror', None) or error}") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(source, "not a regular file; give the path of a config.json")
        try:
            data = file.read(MAX_CONFIG_BYTES + 1)
        except OSError as error:
            raise InputError(source, f"cannot read: {error.strerror or error}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InputError(source, f"larger than {MAX_CONFIG_BYTES // 2**20} MiB; a config.json is a few KiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(source, f"not UTF-8 text (byte {error.start}); a config.json is UTF-8 JSON") from None


def _key_shown(key: str) -> str:
    """A key as an error names it: JSON-quoted where it holds a line break or another unprintable character (the
    error stays one line)."""
    return key if key.isprintable() else json.dumps(key)


def _check_json_values(value: Any, source: str) -> None:
    """Refuse what json.loads lets through but no config holds: unusable numbers and deep nesting."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        field = f"{source}: {path or '(top level)'}"
        if depth > MAX_NESTING:
            raise InputError(field, f"nested deeper than {MAX_NESTING} levels")
        if isinstance(item, _UnusableNumber):
            raise InputError(field, item.reason)
        if isinstance(item, dict):
            children = [(child, f"{path}.{_key_shown(key)}" if path else _key_shown(key))
                        for key, child in item.items()]
        elif isinstance(item, list):
            children = [(child, f"{path}[{index}]") for index, child in enumerate(item)]
        else:
            continue
        stack.extend((child, child_path, depth + 1) for child, child_path in reversed(children))


def read_json_file(path: Path, source: str | None = None) -> Any:
    """A JSON file's value, read with the limits above; every failure is one InputError naming the file."""
    source = source or str(path)
    text = _read_config_text(path, source)
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as error:
        raise InputError(source, f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except RecursionError:
        raise InputError(source, f"nested deeper than {MAX_NESTING} levels") from None
    _check_json_values(value, source)
    return value


# ---- the fields memtui reads, by kind -------------------------------------------------
SIZE_LIMIT = 2**24  # far above any released model's width, depth, head count or vocabulary
POSITION_LIMIT = 2**31 - 1

_SIZE_KEYS = (
    "vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
    "num_experts", "moe_intermediate_size", "decoder_sparse_step",
)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "sliding_window")
_FLAG_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "norm_topk_prob")
_NAME_KEYS = ("model_type", "hidden_act", "hidden_activation", "activation_function")
_PROBABILITY_KEYS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")
_POSITIVE_NUMBER_KEYS = (
    "rope_theta", "rms_norm_eps", "layer_norm_epsilon", "final_logit_softcapping", "attn_logit_softcapping",
    "swiglu_limit",
)


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_field(key: str, value: Any, source: str) -> None:
    """One present, non-null field against its kind: "64" or 64.0 is not taken for a head_dim of 64."""
    if key in _SIZE_KEYS or key in _POSITION_KEYS:
        limit = SIZE_LIMIT if key in _SIZE_KEYS else POSITION_LIMIT
        if not (_is_number(value) and isinstance(value, int) and 1 <= value <= limit):
            raise InputError(f"{source}: {key}", f"must be a whole number from 1 to {limit:,}, got {_shown(value)}")
    elif key in _FLAG_KEYS and not isinstance(value, bool):
        raise InputError(f"{source}: {key}", f"must be true or false, got {_shown(value)}")
    elif key in _NAME_KEYS and not isinstance(value, str):
        raise InputError(f"{source}: {key}", f"must be a string, got {_shown(value)}")
    elif key in _PROBABILITY_KEYS and not (_is_number(value) and 0 <= value <= 1):
        raise InputError(f"{source}: {key}", f"must be a probability from 0 to 1, got {_shown(value)}")
    elif key in _POSITIVE_NUMBER_KEYS and not (_is_number(value) and value > 0):
        raise InputError(f"{source}: {key}", f"must be a positive number, got {_shown(value)}")


_CHECKED_KEYS = (
    *_SIZE_KEYS, *_POSITION_KEYS, *_FLAG_KEYS, *_NAME_KEYS, *_PROBABILITY_KEYS, *_POSITIVE_NUMBER_KEYS,
)


def _check_fields(config: dict[str, Any], source: str) -> None:
    for key in _CHECKED_KEYS:
        if config.get(key) is not None:
            _check_field(key, config[key], source)
    meta = config.get("_memtui")
    if meta is not None and not (isinstance(meta, dict) and isinstance(meta.get("name", ""), str)):
        raise InputError(f"{source}: _memtui", "must be an object whose name is a string")


def _require(config: dict[str, Any], source: str, *keys: str) -> Any:
    """First present key; a missing one is a one-line error naming the file and field."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    raise InputError(f"{source}: {keys[0]}", "missing from config.json")


def _optional(config: dict[str, Any], key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def _llama_like_linears(
    hidden: int, q_dim: int, kv_dim: int, intermediate: int, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool
) -> tuple[LinearLayer, ...]:
    return (
        LinearLayer(name="q_proj", in_features=hidden, out_features=q_dim, bias=qkv_bias),
        LinearLayer(name="k_proj", in_features=hidden, out_features=kv_dim, bias=qkv_bias),
        LinearLayer(name="v_proj", in_features=hidden, out_features=kv_dim, bias=qkv_bias),
        LinearLayer(name="o_proj", in_features=q_dim, out_features=hidden, bias=o_bias),
        LinearLayer(name="gate_proj", in_features=hidden, out_features=intermediate, bias=mlp_bias),
        LinearLayer(name="up_proj", in_features=hidden, out_features=intermediate, bias=mlp_bias),
        LinearLayer(name="down_proj", in_features=intermediate, out_features=hidden, bias=mlp_bias),
    )


def _family(config: Any, source: str) -> Family:
    if not isinstance(config, dict):
        raise InputError(source, "config.json must hold a JSON object")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type not in SUPPORTED_MODEL_TYPES:
        _refuse_non_decoder(config, model_type, source)
        return "generic"  # any other decoder transformers builds: traced layers (memtui.engine.trace.generic)
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        allowed = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        shown = repr(model_type) if isinstance(model_type, str) else _shown(model_type)
        raise InputError(
            f"{source}: model_type",
            f"unsupported architecture {shown}; memtui models decoder-only families",
            allowed,
        )
    return SUPPORTED_MODEL_TYPES[model_type]


# Well-known model types that are no decoder-only language model, refused before any trace.
_NOT_DECODERS = {
    **dict.fromkeys(("t5", "mt5", "umt5", "longt5", "bart", "mbart", "pegasus", "marian", "whisper", "led",
                     "blenderbot", "m2m_100", "nllb-moe", "switch_transformers"), "an encoder-decoder model"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
                     "modernbert"), "an encoder-only model"),
}


def _refuse_non_decoder(config: dict[str, Any], model_type: str, source: str) -> None:
    """The generic path trains AutoModelForCausalLM: encoder-decoder and vision-language models are refused."""
    kind = _NOT_DECODERS.get(model_type)
    if not model_type.replace("_", "").replace("-", "").isalnum():
        kind = "not a model type transformers names"
    if kind is None and config.get("is_encoder_decoder"):
        kind = "an encoder-decoder model"
    if kind is None and (isinstance(config.get("vision_config"), dict) or isinstance(config.get("text_config"), dict)):
        kind = "a vision-language model (give its text_config as a config.json to plan the text decoder alone)"
    if kind is not None:
        raise InputError(f"{source}: model_type", f"unsupported architecture {model_type!r}: {kind}; memtui "
                         "models decoder-only language models")


def _generic_spec(config: dict[str, Any], *, model_id: str, source: str) -> ModelSpec:
    """A decoder of a model_type memtui does not replay: the sizes it names, under the names transformers uses.
    Its layer's linears and parameter count come from the built module (memtui.engine.model.generic)."""
    _check_fields(config, source)
    hidden = _require(config, source, "hidden_size", "n_embd", "d_model")
    heads = _optional(config, "num_attention_heads", _optional(config, "n_head", 1))
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else ""
    meta = _optional(config, "_memtui", {})
    return ModelSpec(
        id=model_id, name=meta.get("name") or model_id, family="generic",
        architecture=architecture if isinstance(architecture, str) else "",
        vocab_size=_require(config, source, "vocab_size"), hidden_size=hidden,
        intermediate_size=_optional(config, "intermediate_size", _optional(config, "ffn_hidden_size", 4 * hidden)),
        num_layers=_require(config, source, "num_hidden_layers", "n_layer", "num_layers"),
        num_heads=heads, num_kv_heads=_optional(config, "num_key_value_heads", _optional(config, "num_kv_heads", heads)),
        head_dim=_optional(config, "head_dim", max(hidden // max(heads, 1), 1)),
        tie_word_embeddings=_optional(config, "tie_word_embeddings", True),
        hidden_act=str(config.get("hidden_act") or config.get("activation") or "unknown"),
        norm="layer", norms_per_layer=2, positions="rope",
        max_position_embeddings=_optional(config, "max_position_embeddings", _optional(config, "n_positions", 4096)),
        linears=(), source=source, config=config,
    )


@dataclass(frozen=True)
class _Sizes:
    """The sizes one config.json gives, checked against each other."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int


def _sizes(config: dict[str, Any], family: Family, source: str) -> _Sizes:
    """Widths and depths (already type-checked), with GPT-2's names and the defaults transformers applies."""
    hidden = _require(config, source, "hidden_size", "n_embd")
    heads = _require(config, source, "num_attention_heads", "n_head")
    if family == "gpt2":
        intermediate = _optional(config, "n_inner", 4 * hidden)
        kv_heads = heads
        max_positions = _require(config, source, "n_positions", "max_position_embeddings")
    elif family in ("qwen3_moe", "deepseek_v3"):
        intermediate = _require(config, source, "moe_intermediate_size")  # the experts' (DeepSeek: MoE layers')
        kv_heads = _optional(config, "num_key_value_heads", heads)
        max_positions = _optional(config, "max_position_embeddings", 4096)
    elif family == "gpt_oss":  # GptOssConfig's own defaults, not Llama's
        intermediate = _require(config, source, "intermediate_size")
        kv_heads = _optional(config, "num_key_value_heads", 8)
        max_positions = _optional(config, "max_position_embeddings", 131_072)
    else:
        intermediate = _require(config, source, "intermediate_size")
        kv_heads = _optional(config, "num_key_value_heads", heads)
        max_positions = _optional(config, "max_position_embeddings", 4096)
    head_dim = config.get("head_dim", 64 if family == "gpt_oss" else None)
    if family == "deepseek_v3":  # DeepseekV3Config sets head_dim to the rotary part (qk_rope_head_dim)
        head_dim = _optional(config, "qk_rope_head_dim", 64)
    if head_dim is None:
        if hidden % heads:
            raise InputError(f"{source}: num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise InputError(
            f"{source}: num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
        )
    return _Sizes(
        vocab=_require(config, source, "vocab_size"), hidden=hidden,
        layers=_require(config, source, "num_hidden_layers", "n_layer"), heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=intermediate, max_positions=max_positions,
    )


def _experts(config: dict[str, Any], family: Family, source: str) -> tuple[int, int]:
    """(experts, experts per token); (0, 0) for a dense family."""
    if family == "deepseek_v3":
        return _deepseek_experts(config, source)
    if family not in MOE_FAMILIES:
        return 0, 0
    experts = _require(config, source, "num_experts" if family == "qwen3_moe" else "num_local_experts")
    experts_per_token = _require(config, source, "num_experts_per_tok")
    if family == "qwen3_moe":
        # memtui replays identical decoder layers: every one must be a sparse (MoE) layer.
        if _optional(config, "decoder_sparse_step", 1) != 1:
            raise InputError(f"{source}: decoder_sparse_step", "memtui models MoE in every layer", "1")
        if _optional(config, "mlp_only_layers", []):
            raise InputError(f"{source}: mlp_only_layers", "memtui models MoE in every layer", "[] (empty)")
    if experts_per_token > experts:
        raise InputError(
            f"{source}: num_experts_per_tok", f"{experts_per_token} exceeds num_local_experts {experts}"
        )
    return experts, experts_per_token


def _linears(config: dict[str, Any], family: Family, sizes: _Sizes, experts: int) -> tuple[LinearLayer, ...]:
    """The weight matrices of one decoder layer, named as in the family's transformers module tree."""
    hidden, intermediate = sizes.hidden, sizes.intermediate
    q_dim, kv_dim = sizes.heads * sizes.head_dim, sizes.kv_heads * sizes.head_dim
    if family == "gpt2":
        return (
            LinearLayer(name="c_attn", in_features=hidden, out_features=3 * hidden, bias=True),
            LinearLayer(name="attn.c_proj", in_features=hidden, out_features=hidden, bias=True),
            LinearLayer(name="c_fc", in_features=hidden, out_features=intermediate, bias=True),
            LinearLayer(name="mlp.c_proj", in_features=intermediate, out_features=hidden, bias=True),
        )
    if family == "phi3":
        return (
            LinearLayer(name="qkv_proj", in_features=hidden, out_features=q_dim + 2 * kv_dim, bias=False),
            LinearLayer(name="o_proj", in_features=q_dim, out_features=hidden, bias=False),
            LinearLayer(name="gate_up_proj", in_features=hidden, out_features=2 * intermediate, bias=False),
            LinearLayer(name="down_proj", in_features=intermediate, out_features=hidden, bias=False),
        )
    if family == "deepseek_v3":
        return _deepseek_linears(config, sizes, experts, dense=False)
    if family in MOE_FAMILIES:
        # GptOssConfig's attention_bias defaults to true; its experts always have biases
        attention_bias = family in ("qwen3_moe", "gpt_oss") and _optional(config, "attention_bias", family == "gpt_oss")
        expert_bias = family == "gpt_oss"
        return (
            LinearLayer(name="q_proj", in_features=hidden, out_features=q_dim, bias=attention_bias),
            LinearLayer(name="k_proj", in_features=hidden, out_features=kv_dim, bias=attention_bias),
            LinearLayer(name="v_proj", in_features=hidden, out_features=kv_dim, bias=attention_bias),
            LinearLayer(name="o_proj", in_features=q_dim, out_features=hidden, bias=attention_bias),
            LinearLayer(
                name="experts.gate_up_proj", in_features=hidden, out_features=2 * intermediate, bias=expert_bias,
                experts=experts,
            ),
            LinearLayer(
                name="experts.down_proj", in_features=intermediate, out_features=hidden, bias=expert_bias,
                experts=experts,
            ),
        )
    attention_bias = _optional(config, "attention_bias", False)
    return _llama_like_linears(
        hidden, q_dim, kv_dim, intermediate,
        qkv_bias=family == "qwen2" or attention_bias, o_bias=attention_bias,
        # OLMo 2's and Gemma 3's MLPs have no bias whatever the config says
        mlp_bias=family not in ("olmo2", "gemma3") and _optional(config, "mlp_bias", False),
    )


# DeepseekV3Config's defaults for the fields memtui reads (DeepSeek-V3's values).
DEEPSEEK_V3_DEFAULTS: dict[str, Any] = {
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
}


def deepseek_value(config: dict[str, Any], key: str) -> Any:
    """A DeepseekV3Config field as transformers reads it (its default when absent; q_lora_rank may be null)."""
    if key == "q_lora_rank":
        return config.get(key, DEEPSEEK_V3_DEFAULTS[key])
    return _optional(config, key, DEEPSEEK_V3_DEFAULTS[key])


def _deepseek_check(config: dict[str, Any], source: str) -> None:
    """Multi-head latent attention's ranks and widths, and the grouped router's sizes: whole numbers, consistent."""
    for key in DEEPSEEK_V3_DEFAULTS:
        value = deepseek_value(config, key)
        low = 0 if key == "first_k_dense_replace" else 1
        if key == "routed_scaling_factor":
            if not (_is_number(value) and value > 0):
                raise InputError(f"{source}: {key}", f"must be a positive number, got {_shown(value)}")
        elif not (key == "q_lora_rank" and value is None) and not (
                _is_number(value) and isinstance(value, int) and low <= value <= SIZE_LIMIT):
            raise InputError(f"{source}: {key}",
                             f"must be a whole number from {low} to {SIZE_LIMIT:,}, got {_shown(value)}")
    experts, groups = deepseek_value(config, "n_routed_experts"), deepseek_value(config, "n_group")
    if experts % groups:
        raise InputError(f"{source}: n_group", f"{groups} does not divide n_routed_experts {experts}")
    if deepseek_value(config, "topk_group") > groups:
        raise InputError(f"{source}: topk_group", f"{deepseek_value(config, 'topk_group')} exceeds n_group {groups}")


def _deepseek_experts(config: dict[str, Any], source: str) -> tuple[int, int]:
    _deepseek_check(config, source)
    experts, per_token = deepseek_value(config, "n_routed_experts"), deepseek_value(config, "num_experts_per_tok")
    if per_token > experts:
        raise InputError(f"{source}: num_experts_per_tok", f"{per_token} exceeds n_routed_experts {experts}")
    return experts, per_token


def _deepseek_linears(config: dict[str, Any], sizes: _Sizes, experts: int, *, dense: bool) -> tuple[LinearLayer, ...]:
    """DeepseekV3DecoderLayer's weight matrices: multi-head latent attention (low-rank q and kv projections), then
    a dense MLP (`dense`) or the MoE: stacked routed experts and the shared experts' MLP (named as peft sees them)."""
    hidden, heads = sizes.hidden, sizes.heads
    bias = _optional(config, "attention_bias", False)
    q_rank, kv_rank = deepseek_value(config, "q_lora_rank"), deepseek_value(config, "kv_lora_rank")
    nope, rope, v_dim = (deepseek_value(config, key) for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if q_rank is None:
        query: tuple[LinearLayer, ...] = (
            LinearLayer(name="q_proj", in_features=hidden, out_features=heads * (nope + rope), bias=False),)
    else:
        query = (LinearLayer(name="q_a_proj", in_features=hidden, out_features=q_rank, bias=bias),
                 LinearLayer(name="q_b_proj", in_features=q_rank, out_features=heads * (nope + rope), bias=False))
    attention = query + (
        LinearLayer(name="kv_a_proj_with_mqa", in_features=hidden, out_features=kv_rank + rope, bias=bias),
        LinearLayer(name="kv_b_proj", in_features=kv_rank, out_features=heads * (nope + v_dim), bias=False),
        LinearLayer(name="o_proj", in_features=heads * v_dim, out_features=hidden, bias=bias),
    )
    if dense:
        return attention + _llama_like_linears(hidden, 0, 0, _require(config, "", "intermediate_size"), qkv_bias=False,
                                               o_bias=False, mlp_bias=False)[4:]
    shared = sizes.intermediate * deepseek_value(config, "n_shared_experts")
    return attention + (
        LinearLayer(name="experts.gate_up_proj", in_features=hidden, out_features=2 * sizes.intermediate, bias=False,
                    experts=experts),
        LinearLayer(name="experts.down_proj", in_features=sizes.intermediate, out_features=hidden, bias=False,
                    experts=experts),
    ) + _llama_like_linears(hidden, 0, 0, shared, qkv_bias=False, o_bias=False, mlp_bias=False)[4:]


def _text_config(config: Any, source: str) -> tuple[Any, tuple[str, ...]]:
    """A multimodal Gemma 3 config.json: its text decoder's config (Gemma3TextConfig's defaults filled in)."""
    if not isinstance(config, dict) or config.get("model_type") != "gemma3":
        return config, ()
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise InputError(f"{source}: text_config", "missing from a gemma3 (multimodal) config.json",
                         "a text_config object, or a gemma3_text config.json")
    merged = {**GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text"}
    if "_memtui" in config:
        merged["_memtui"] = config["_memtui"]
    note = (f"{source} is a multimodal Gemma 3 config: memtui trains its text decoder (Gemma3ForCausalLM, "
            "text_config) alone; the vision tower and projector are left out.")
    return merged, (note,)


LAYER_TYPES = ("sliding_attention", "full_attention")


def attention_layer_types(spec: ModelSpec) -> list[str]:
    """Each decoder layer's attention kind where a family alternates them: the config's layer_types, or as
    Gemma2Config (every second layer full) and Gemma3TextConfig (every sliding_window_pattern-th) make them;
    empty elsewhere."""
    given = spec.config.get("layer_types")
    if given:
        return list(given)
    if spec.family not in ("gemma2", "gemma3"):
        return []
    pattern = 2 if spec.family == "gemma2" else int(spec.config.get("sliding_window_pattern", 6) or 6)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(spec.num_layers)]


def _gpt_oss_notes(config: dict[str, Any], layers: int, source: str) -> tuple[str, ...]:
    """gpt-oss: its layer_types checked (the replay reads them); a note when the checkpoint is MXFP4."""
    layer_types = config.get("layer_types")
    if layer_types is not None and not (
        isinstance(layer_types, list) and len(layer_types) == layers and all(kind in LAYER_TYPES for kind in layer_types)
    ):
        raise InputError(f"{source}: layer_types", f"must list one kind per layer ({layers})", ", ".join(LAYER_TYPES))
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4":
        return (f"{source} names an MXFP4-quantized checkpoint: memtui models training its bf16 weights, "
                "dequantized at load (Mxfp4Config(dequantize=True), as the OpenAI cookbook's TRL fine-tune loads "
                "them); MXFP4 experts cannot be trained.",)
    return ()


def model_spec_from_config(config: dict[str, Any], *, model_id: str, source: str) -> ModelSpec:
    """Build a ModelSpec from a config.json dict; `source` names the file in errors."""
    config, notes = _text_config(config, source)
    family = _family(config, source)
    if family == "generic":
        return _generic_spec(config, model_id=model_id, source=source)
    _check_fields(config, source)
    sizes = _sizes(config, family, source)
    experts, experts_per_token = _experts(config, family, source)
    if family == "gpt_oss":
        notes += _gpt_oss_notes(config, sizes.layers, source)
    meta = _optional(config, "_memtui", {})
    hidden_act = config.get("hidden_act") or config.get("hidden_activation") or config.get("activation_function")
    softcapped = family in ("gemma2", "gemma3")
    qk_norm = family in QK_NORM_FAMILIES
    if family == "olmo2":  # OLMo 2 normalises the whole projection, not each head
        qk_widths = (sizes.heads * sizes.head_dim, sizes.kv_heads * sizes.head_dim)
    elif family == "deepseek_v3":  # q_a_layernorm and kv_a_layernorm over the low-rank latents
        qk_norm = True
        qk_widths = (deepseek_value(config, "q_lora_rank") or 0, deepseek_value(config, "kv_lora_rank"))
    else:
        qk_widths = (sizes.head_dim, sizes.head_dim) if qk_norm else (0, 0)
    return ModelSpec(
        id=model_id,
        name=meta.get("name") or model_id,
        family=family,
        architecture=CAUSAL_LM_CLASS[family],
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_layers=sizes.layers,
        num_heads=sizes.heads,
        num_kv_heads=sizes.kv_heads,
        head_dim=sizes.head_dim,
        tie_word_embeddings=_optional(config, "tie_word_embeddings", family in ("gpt2", *GEMMA_FAMILIES)),
        hidden_act=hidden_act or "silu",
        norm="layer" if family == "gpt2" else "rms",
        norms_per_layer=4 if family in ("gemma2", "gemma3") else 2,
        positions="learned" if family == "gpt2" else "rope",
        max_position_embeddings=sizes.max_positions,
        num_experts=experts,
        experts_per_token=experts_per_token,
        final_logit_softcapping=config.get("final_logit_softcapping") if softcapped else None,
        attn_logit_softcapping=config.get("attn_logit_softcapping") if family == "gemma2" else None,
        qk_norm=qk_norm,
        qk_norm_widths=qk_widths,
        notes=notes + _deepseek_notes(config, family),
        linears=_linears(config, family, sizes, experts),
        **(_deepseek_dense(config, sizes, experts, source, notes) if family == "deepseek_v3" else {}),
        source=source,
        config=config,
    )


def _deepseek_dense(config: dict[str, Any], sizes: _Sizes, experts: int, source: str, notes) -> dict[str, Any]:
    """The leading dense layers (first_k_dense_replace) and their linears."""
    _require(config, source, "intermediate_size")
    return {"dense_layers": min(deepseek_value(config, "first_k_dense_replace"), sizes.layers),
            "dense_linears": _deepseek_linears(config, sizes, experts, dense=True)}


def _deepseek_notes(config: dict[str, Any], family: Family) -> tuple[str, ...]:
    if family != "deepseek_v3" or not _optional(config, "num_nextn_predict_layers", 0):
        return ()
    return ("DeepSeek-V3's multi-token prediction layers (num_nextn_predict_layers) are left out: transformers' "
            "DeepseekV3ForCausalLM does not build them, so training through it does not hold them.",)


def load_config_file(path: Path, *, model_id: str | None = None) -> ModelSpec:
    """A config.json on disk (a preset or a user's file); errors name the file."""
    config = read_json_file(path)
    if model_id is None:
        model_id = path.parent.name if path.name == "config.json" else path.stem
    return model_spec_from_config(config, model_id=model_id, source=str(path))
