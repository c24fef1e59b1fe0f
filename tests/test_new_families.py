"""OLMo 2, Gemma 3 (text) and Qwen3-MoE: presets, config.json handling, and the replay held to the trace."""

from __future__ import annotations

import copy

import pytest

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model import presets
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig

# Released checkpoints' parameter counts (safetensors metadata). Gemma 3 4B/12B/27B ship with a vision tower;
# their presets are the text decoder alone, so only transformers' build holds them (below).
RELEASED_PARAMS = {
    "olmo-2-7b": 7_298_617_344,
    "olmo-2-13b": 13_716_198_400,
    "gemma-3-1b": 999_885_952,
    "qwen3-30b-a3b": 30_532_122_624,
}
NEW_PRESETS = ["olmo-2-7b", "olmo-2-13b", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b", "qwen3-30b-a3b"]


@pytest.mark.parametrize("model_id", sorted(RELEASED_PARAMS))
def test_parameter_count_equals_released_checkpoint(model_id):
    assert presets.models()[model_id].params == RELEASED_PARAMS[model_id]


@pytest.mark.parametrize("model_id", NEW_PRESETS)
def test_parameter_count_equals_transformers_build(model_id):
    pytest.importorskip("torch")
    from memtui.engine.torchside.build import hf_model_on_meta

    spec = presets.models()[model_id]
    model = hf_model_on_meta(spec)
    assert type(model).__name__ == spec.architecture
    assert sum(p.numel() for _, p in model.named_parameters()) == spec.params


def _gemma3_multimodal_config() -> dict:
    """google/gemma-3-4b-pt's config.json as released: the text_config names only what differs from the defaults."""
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }


def test_a_multimodal_gemma3_config_trains_its_text_decoder_with_a_note():
    spec = model_spec_from_config(_gemma3_multimodal_config(), model_id="gemma-3-4b-pt", source="config.json")
    text_preset = resolve_model("gemma-3-4b")
    assert spec.family == "gemma3" and spec.architecture == "Gemma3ForCausalLM"
    assert spec.params == text_preset.params
    assert spec.hf_config()["model_type"] == "gemma3_text"
    budget = estimate(TrainingConfig(model="gemma-3-4b", seq_len=1024), model=spec)
    assert any("text decoder" in note and "vision" in note for note in budget.notes)
    assert not any("text decoder" in note for note in estimate(TrainingConfig(model="gemma-3-4b", seq_len=1024)).notes)


def test_a_qwen3_moe_config_with_dense_layers_is_refused_naming_the_field():
    config = copy.deepcopy(resolve_model("qwen3-30b-a3b").hf_config())
    config["mlp_only_layers"] = [0, 1]
    with pytest.raises(InputError, match="mlp_only_layers"):
        model_spec_from_config(config, model_id="x", source="config.json")


def test_olmo2_qk_norms_span_the_whole_projections():
    spec = resolve_model("olmo-2-7b")
    assert spec.qk_norm_widths == (spec.q_dim, spec.kv_dim)
    assert resolve_model("qwen3-30b-a3b").qk_norm_widths == (128, 128)


# The accuracy matrix of the new families: real dimensions with a few layers (the replay extends any count the
# same way), each held to the trace at the step's tensor peak and at the end of the forward (the activations).
# Plain full-size rows of each family are in benchmarks/accuracy.py (docs/accuracy.md); here, the cases that differ.
ESTIMATE_VS_TRACE = [
    ("olmo-2-7b", 4, dict(precision="bf16-true", batch_size=2, seq_len=512, attention="eager", checkpointing="full")),
    ("olmo-2-7b", 4, dict(precision="bf16-true", batch_size=2, seq_len=1024, lora_rank=8, lora_targets="all-linear")),
    # Gemma 3 1B: one key/value head; 1024 tokens pass the 512-token window (an explicit sliding mask)
    ("gemma-3-1b", 7, dict(precision="bf16-mixed", batch_size=2, seq_len=1024)),
    ("gemma-3-1b", 7, dict(precision="bf16-true", batch_size=2, seq_len=512, attention="eager")),
    ("gemma-3-1b", 7, dict(precision="bf16-true", batch_size=1, seq_len=256, lora_rank=8, checkpointing="full")),
    # Gemma 3 4B: grouped key/value heads copied under the mask in sliding layers only (layer 5 is full)
    ("gemma-3-4b", 7, dict(precision="bf16-mixed", batch_size=1, seq_len=2048, checkpointing="selective")),
    ("qwen3-30b-a3b", 4, dict(precision="bf16-true", batch_size=2, seq_len=2048, lora_rank=8)),
]


@pytest.mark.parametrize(("model", "layers", "options"), ESTIMATE_VS_TRACE,
                         ids=lambda value: "-".join(str(v) for v in value.values()) if isinstance(value, dict) else str(value))
def test_estimate_matches_trace(model, layers, options):
    from memtui.engine.trace.runner import trace

    config = copy.deepcopy(resolve_model(model).hf_config())
    config["num_hidden_layers"] = layers
    spec = model_spec_from_config(config, model_id=model, source="test")
    training = TrainingConfig(model=model, gpu="h100-80gb", **options)
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    traced = trace(training, model=spec)
    estimated = estimate(training, model=spec)
    assert abs(estimated.tensor_peak_bytes - workspace - traced.traced_tensor_peak_bytes) \
        <= 0.002 * traced.traced_tensor_peak_bytes
    traced_loss = next(point.bytes for point in traced.budget.timeline if point.phase == "loss")
    estimated_loss = next(point.bytes for point in estimated.timeline if point.phase == "loss") - workspace
    assert abs(estimated_loss - traced_loss) <= 0.002 * traced_loss


def test_peft_marks_gemma3s_scaled_embedding_output_as_the_input_leaf():
    """With LoRA and checkpointing, peft makes the input embeddings' output require grad and autograd holds it
    until backward ends. Gemma 3 scales inside the embedding module, so only the scaled hidden states stay:
    the estimate keeps no second (unscaled) copy. Exact to allocator rounding, not just within 0.2%."""
    from memtui.engine.trace.runner import trace

    config = copy.deepcopy(resolve_model("gemma-3-4b").hf_config())
    config["num_hidden_layers"] = 7
    spec = model_spec_from_config(config, model_id="gemma-3-4b", source="test")
    training = TrainingConfig(model="gemma-3-4b", gpu="h100-80gb", precision="bf16-true", seq_len=2048, lora_rank=8,
                              checkpointing="full")
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    traced = next(point.bytes for point in trace(training, model=spec).budget.timeline if point.phase == "loss")
    estimated = next(point.bytes for point in estimate(training, model=spec).timeline if point.phase == "loss")
    assert abs(estimated - workspace - traced) < 2**20  # one hidden state here is 10 MiB
