"""gpt-oss (OpenAI gpt-oss-20b and gpt-oss-120b): presets, config.json handling, and the replay held to the trace."""

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

# The model card's counts (openai/gpt-oss-20b and -120b: 20.91B and 116.83B), every expert dequantized to bf16.
RELEASED_PARAMS = {"gpt-oss-20b": 20_914_757_184, "gpt-oss-120b": 116_829_156_672}


@pytest.mark.parametrize("model_id", sorted(RELEASED_PARAMS))
def test_parameter_count_equals_released_checkpoint(model_id):
    assert presets.models()[model_id].params == RELEASED_PARAMS[model_id]


@pytest.mark.parametrize("model_id", sorted(RELEASED_PARAMS))
def test_parameter_count_equals_transformers_build(model_id):
    pytest.importorskip("torch")
    from memtui.engine.torchside.build import hf_model_on_meta

    spec = presets.models()[model_id]
    model = hf_model_on_meta(spec)
    assert type(model).__name__ == spec.architecture == "GptOssForCausalLM"
    assert sum(p.numel() for _, p in model.named_parameters()) == spec.params
    # transformers' defaults for this class: eager attention (no SDPA with sinks), grouped_mm experts
    assert model.config._attn_implementation == "eager"
    assert model.config._experts_implementation == "grouped_mm"


def _scaled(layers: int = 4, experts: int = 8) -> dict:
    """gpt-oss-20b's config.json with fewer layers and experts (every width as released)."""
    config = copy.deepcopy(resolve_model("gpt-oss-20b").hf_config())
    config["num_hidden_layers"] = layers
    config["layer_types"] = config["layer_types"][:layers]
    config["num_local_experts"] = experts
    return config


def test_the_mxfp4_checkpoint_is_planned_as_bf16_weights_with_a_note():
    budget = estimate(TrainingConfig(model="gpt-oss-20b", precision="bf16-true", seq_len=1024, lora_rank=8))
    assert any("MXFP4" in note and "bf16" in note for note in budget.notes)
    unquantized = {key: value for key, value in _scaled().items() if key != "quantization_config"}
    assert not model_spec_from_config(unquantized, model_id="x", source="config.json").notes


def test_flash_attention_is_eager_for_gpt_oss_with_a_note():
    flash = estimate(TrainingConfig(model="gpt-oss-20b", precision="bf16-true", seq_len=1024, lora_rank=8))
    eager = estimate(TrainingConfig(model="gpt-oss-20b", precision="bf16-true", seq_len=1024, lora_rank=8,
                                    attention="eager"))
    assert flash.tensor_peak_bytes == eager.tensor_peak_bytes
    assert any("sinks" in note for note in flash.notes)
    assert not any("sinks" in note for note in eager.notes)


def test_selective_checkpointing_is_refused_naming_the_field():
    with pytest.raises(InputError, match="checkpointing"):
        estimate(TrainingConfig(model="gpt-oss-20b", checkpointing="selective"))


def test_layer_types_must_name_one_kind_per_layer():
    config = _scaled()
    config["layer_types"] = ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]
    with pytest.raises(InputError, match="layer_types"):
        model_spec_from_config(config, model_id="x", source="config.json")


def test_router_bias_and_sinks_are_trained_parameters():
    """Full fine-tuning trains every parameter tensor: the router's bias and the sinks are two more per layer."""
    from memtui.engine.estimator.layout import param_layout, trainable_tensor_numels

    spec = resolve_model("gpt-oss-20b")
    config = TrainingConfig(model="gpt-oss-20b", precision="bf16-true")
    numels = trainable_tensor_numels(config, spec)
    assert sum(numels) == spec.params
    assert param_layout(config, spec).trainable_tensor_count == len(numels)


def test_estimate_matches_trace():
    """bf16-mixed + LoRA + full checkpointing on gpt-oss-20b's widths (4 layers, 8 experts): fp32 sinks in the
    concatenated scores, both masks held by the checkpoint frames, the biased experts. Held to the trace at the
    step's tensor peak and at the end of the forward (the activations)."""
    from memtui.engine.trace.runner import trace

    spec = model_spec_from_config(_scaled(), model_id="gpt-oss-20b", source="test")
    training = TrainingConfig(model="gpt-oss-20b", gpu="h100-80gb", precision="bf16-mixed", batch_size=2, seq_len=512,
                              lora_rank=8, checkpointing="full")
    traced = trace(training, model=spec)
    estimated = estimate(training, model=spec)
    # the estimate's figures include the modelled cuBLAS workspace, which the trace does not see
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    pairs = {
        "tensor peak": (estimated.tensor_peak_bytes, traced.traced_tensor_peak_bytes),
        "end of forward": tuple(next(point.bytes for point in timeline if point.phase == "loss")
                                for timeline in (estimated.timeline, traced.budget.timeline)),
    }
    for moment, (estimated_bytes, traced_bytes) in pairs.items():
        assert abs(estimated_bytes - workspace - traced_bytes) <= 0.002 * traced_bytes, moment
