"""DeepSeek-V3 (deepseek_v3): presets, config.json handling, and the replay held to the trace."""

from __future__ import annotations

import copy

import pytest

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.model import presets
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_model
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import resolve_lora_targets
from tests.test_new_families import test_estimate_matches_trace as held_to_trace

PRESETS = ["deepseek-v3", "deepseek-r1", "moonlight-16b-a3b"]


def test_deepseek_v3_count_is_the_released_main_models():
    """DeepSeek-V3's 671,026,419,200 main-model weights hold each MoE layer's e_score_correction_bias (a buffer in
    transformers, not a parameter) and leave out the multi-token prediction layer (num_nextn_predict_layers)."""
    spec = presets.models()["deepseek-v3"]
    moe_layers = spec.num_layers - spec.dense_layers
    assert spec.params + moe_layers * spec.num_experts == 671_026_419_200
    assert presets.models()["deepseek-r1"].params == spec.params


@pytest.mark.parametrize("model_id", ["deepseek-v3", "moonlight-16b-a3b"])
def test_parameter_count_equals_transformers_build(model_id):
    pytest.importorskip("torch")
    from memtui.engine.torchside.build import hf_model_on_meta

    spec = presets.models()[model_id]
    model = hf_model_on_meta(spec)
    assert type(model).__name__ == spec.architecture == "DeepseekV3ForCausalLM"
    assert sum(p.numel() for _, p in model.named_parameters()) == spec.params
    assert len(model.model.layers) == spec.num_layers  # no multi-token prediction layer is built


def test_layers_are_dense_then_moe_and_mtp_is_a_note():
    v3, moonlight = resolve_model("deepseek-v3"), resolve_model("moonlight-16b-a3b")
    assert (v3.dense_layers, moonlight.dense_layers) == (3, 1)
    assert [count for count, _linears in v3.layer_groups()] == [3, 58]
    assert "q_a_proj" in v3.linear_names and "q_proj" in moonlight.linear_names  # q_lora_rank null: one projection
    assert v3.qk_norm_widths == (1536, 512) and moonlight.qk_norm_widths == (0, 512)
    assert any("multi-token prediction" in note for note in v3.notes)
    assert not moonlight.notes  # num_nextn_predict_layers 0
    budget = estimate(TrainingConfig(model="deepseek-v3", gpu="h100-80gb", precision="bf16-true", seq_len=1024))
    assert any("multi-token prediction" in note for note in budget.notes)


def test_inconsistent_router_groups_are_refused_naming_the_field():
    config = copy.deepcopy(resolve_model("deepseek-v3").hf_config())
    config["n_group"] = 7
    with pytest.raises(InputError, match="n_group"):
        model_spec_from_config(config, model_id="x", source="config.json")
    config["n_group"], config["kv_lora_rank"] = 8, "512"
    with pytest.raises(InputError, match="kv_lora_rank"):
        model_spec_from_config(config, model_id="x", source="config.json")


def test_lora_adapts_the_attention_projections_and_refuses_the_mlp_names():
    """peft maps gate_proj/up_proj/down_proj onto the routed experts' stacked weights (not the dense or shared
    MLPs): all-linear means the attention projections, and the MLP names are refused with the reason."""
    spec = resolve_model("deepseek-v3")
    targets = resolve_lora_targets(TrainingConfig(model="deepseek-v3", lora_rank=8, lora_targets="all-linear"), spec)
    assert targets == ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    with pytest.raises(InputError, match="routed experts"):
        resolve_lora_targets(TrainingConfig(model="deepseek-v3", lora_rank=8, lora_targets="q_a_proj,down_proj"), spec)


def test_estimate_matches_trace():
    """DeepSeek-V3's own widths at six layers: three dense, three MoE (the replayed middle layer is an MoE one,
    two of the others dense), grouped top-k over 8 groups, the low-rank query path; LoRA on every attention
    projection, so the activations (not the 1.2 TB of frozen weights' states) decide the peak."""
    held_to_trace("deepseek-v3", 6, dict(precision="bf16-true", batch_size=1, seq_len=2048, lora_rank=8,
                                         lora_targets="all-linear"))


def test_a_live_runs_scaled_copy_keeps_an_moe_layer_and_the_dense_mlps_width():
    """Two layers of DeepSeek-V3 (three dense ones): the copy keeps one dense and one MoE layer, and its dense MLP
    scales intermediate_size (not the experts' moe_intermediate_size)."""
    from memtui.engine.live.sizing import Shape, scaled_spec

    spec = resolve_model("deepseek-v3")
    copy_spec = scaled_spec(spec, Shape(layers=2, kv_heads=4, vocab=8192, seq_len=256, batch_size=1))
    assert [count for count, _linears in copy_spec.layer_groups()] == [1, 1]
    width = copy_spec.hidden_size / spec.hidden_size
    dense_mlp = next(linear for linear in copy_spec.dense_linears if linear.name == "gate_proj")
    assert dense_mlp.out_features == round(spec.config["intermediate_size"] * width / 16) * 16


@pytest.mark.parametrize(("model_id", "config_class"), [("moonlight-16b-a3b", "DeepseekV3Config"),
                                                        ("qwen3-30b-a3b", "Qwen3MoeConfig")])
def test_a_config_without_norm_topk_prob_is_routed_as_transformers_defaults_it(model_id, config_class):
    """The top-k weights' renormalisation adds the router's sum and division (saved for backward under LoRA):
    a config.json without the key gets transformers' default (DeepSeek-V3 true, Qwen3-MoE false)."""
    transformers = pytest.importorskip("transformers")
    default = getattr(transformers, config_class)().norm_topk_prob
    config = copy.deepcopy(resolve_model(model_id).hf_config())
    config["num_hidden_layers"] = 3
    training = TrainingConfig(model=model_id, precision="bf16-true", seq_len=1024, lora_rank=8,
                              lora_targets="all-linear")

    def peak(value) -> int:
        changed = {key: item for key, item in config.items() if key != "norm_topk_prob"}
        if value is not None:
            changed["norm_topk_prob"] = value
        return estimate(training, model=model_spec_from_config(changed, model_id=model_id, source="t")).tensor_peak_bytes

    assert peak(True) != peak(False)  # the renormalisation's tensors are in the peak
    assert peak(None) == peak(default)
