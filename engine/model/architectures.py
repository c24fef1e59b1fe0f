"""From a Hugging Face config.json to the architecture facts the estimator needs.

Every supported family is described by what its transformers implementation
actually builds: which linear layers a decoder layer has (names as in the
module tree, so LoRA targets match peft's), which norms, whether the MLP is
gated, and how embeddings and the output head are laid out. Parameter counts
follow from that and equal the released checkpoints'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from memtui.engine.errors import InputError

Family = Literal["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "mixtral"]

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
    linears: tuple[LinearLayer, ...]
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
        return 2 * self.head_dim if self.qk_norm else 0

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden_size if self.is_moe else 0

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
        )

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
        return (
            self.embedding_params
            + self.num_layers * self.layer_params
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


def _require(config: dict[str, Any], source: str, *keys: str) -> Any:
    """First present key; a missing one is a one-line error naming the file and field."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    raise InputError(f"{source}: {keys[0]}", "missing from config.json")


def _positive_int(config: dict[str, Any], source: str, *keys: str) -> int:
    value = _require(config, source, *keys)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{source}: {keys[0]}", f"must be a positive integer, got {value!r}")
    return value


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


def model_spec_from_config(config: dict[str, Any], *, model_id: str, source: str) -> ModelSpec:
    """Build a ModelSpec from a config.json dict; `source` names the file in errors."""
    if not isinstance(config, dict):
        raise InputError(source, "config.json must hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        allowed = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise InputError(
            f"{source}: model_type",
            f"unsupported architecture {model_type!r}; memtui models decoder-only families",
            allowed,
        )
    family = SUPPORTED_MODEL_TYPES[model_type]
    meta = config.get("_memtui", {}) if isinstance(config.get("_memtui"), dict) else {}
    name = str(meta.get("name", model_id))

    vocab = _positive_int(config, source, "vocab_size")
    hidden = _positive_int(config, source, "hidden_size", "n_embd")
    layers = _positive_int(config, source, "num_hidden_layers", "n_layer")
    heads = _positive_int(config, source, "num_attention_heads", "n_head")
    if family == "gpt2":
        intermediate = config.get("n_inner") or 4 * hidden
        kv_heads = heads
        max_positions = _positive_int(config, source, "n_positions", "max_position_embeddings")
    else:
        intermediate = _positive_int(config, source, "intermediate_size")
        kv_heads = config.get("num_key_value_heads") or heads
        max_positions = int(config.get("max_position_embeddings") or 4096)
    head_dim = config.get("head_dim") or (hidden // heads)
    if family in ("llama", "mistral", "qwen2", "mixtral", "phi3", "gpt2") and not config.get("head_dim"):
        if hidden % heads:
            raise InputError(f"{source}: num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
    if heads % kv_heads:
        raise InputError(
            f"{source}: num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
        )
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    tie = bool(config.get("tie_word_embeddings", family in ("gpt2", "gemma", "gemma2")))
    norm: Literal["rms", "layer"] = "layer" if family == "gpt2" else "rms"
    norms_per_layer = 4 if family == "gemma2" else 2
    positions: Literal["rope", "learned"] = "learned" if family == "gpt2" else "rope"
    hidden_act = str(config.get("hidden_act") or config.get("hidden_activation") or config.get("activation_function") or "silu")
    experts = 0
    experts_per_token = 0

    if family == "gpt2":
        linears: tuple[LinearLayer, ...] = (
            LinearLayer(name="c_attn", in_features=hidden, out_features=3 * hidden, bias=True),
            LinearLayer(name="attn.c_proj", in_features=hidden, out_features=hidden, bias=True),
            LinearLayer(name="c_fc", in_features=hidden, out_features=intermediate, bias=True),
            LinearLayer(name="mlp.c_proj", in_features=intermediate, out_features=hidden, bias=True),
        )
    elif family == "phi3":
        linears = (
            LinearLayer(name="qkv_proj", in_features=hidden, out_features=q_dim + 2 * kv_dim, bias=False),
            LinearLayer(name="o_proj", in_features=q_dim, out_features=hidden, bias=False),
            LinearLayer(name="gate_up_proj", in_features=hidden, out_features=2 * intermediate, bias=False),
            LinearLayer(name="down_proj", in_features=intermediate, out_features=hidden, bias=False),
        )
    elif family == "mixtral":
        experts = _positive_int(config, source, "num_local_experts")
        experts_per_token = _positive_int(config, source, "num_experts_per_tok")
        if experts_per_token > experts:
            raise InputError(
                f"{source}: num_experts_per_tok", f"{experts_per_token} exceeds num_local_experts {experts}"
            )
        linears = (
            LinearLayer(name="q_proj", in_features=hidden, out_features=q_dim, bias=False),
            LinearLayer(name="k_proj", in_features=hidden, out_features=kv_dim, bias=False),
            LinearLayer(name="v_proj", in_features=hidden, out_features=kv_dim, bias=False),
            LinearLayer(name="o_proj", in_features=q_dim, out_features=hidden, bias=False),
            LinearLayer(
                name="experts.gate_up_proj", in_features=hidden, out_features=2 * intermediate, bias=False,
                experts=experts,
            ),
            LinearLayer(
                name="experts.down_proj", in_features=intermediate, out_features=hidden, bias=False,
                experts=experts,
            ),
        )
    else:
        attention_bias = bool(config.get("attention_bias", False))
        qkv_bias = family == "qwen2" or attention_bias
        linears = _llama_like_linears(
            hidden, q_dim, kv_dim, intermediate,
            qkv_bias=qkv_bias, o_bias=attention_bias, mlp_bias=bool(config.get("mlp_bias", False)),
        )

    return ModelSpec(
        id=model_id,
        name=name,
        family=family,
        architecture=CAUSAL_LM_CLASS[family],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie,
        hidden_act=hidden_act,
        norm=norm,
        norms_per_layer=norms_per_layer,
        positions=positions,
        max_position_embeddings=max_positions,
        num_experts=experts,
        experts_per_token=experts_per_token,
        final_logit_softcapping=config.get("final_logit_softcapping") if family == "gemma2" else None,
        attn_logit_softcapping=config.get("attn_logit_softcapping") if family == "gemma2" else None,
        qk_norm=family == "qwen3",
        linears=linears,
        source=source,
        config=config,
    )


def load_config_file(path: Path, *, model_id: str | None = None) -> ModelSpec:
    """A config.json on disk (a preset or a user's file); errors name the file."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("model", f"no preset or file named {source!r}") from None
    except OSError as error:
        raise InputError(source, f"cannot read: {error.strerror or error}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(source, f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if model_id is None:
        model_id = path.parent.name if path.name == "config.json" else path.stem
    return model_spec_from_config(config, model_id=model_id, source=source)
