"""--modeling litgpt: the estimator's replay of LitGPT's GPT against the trace of memtui's torch re-implementation
(which benchmarks/litgpt_probe.py checks against LitGPT's own code), on a small Llama-shaped model."""

import json

import pytest

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.trace.runner import trace

SMALL = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 4096, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _config(tmp_path, **changes) -> TrainingConfig:
    model = {**SMALL, **changes.pop("model", {})}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(model))
    options = dict(model=str(path), gpu="h100-80gb", precision="bf16-true", batch_size=2, seq_len=256, lora_rank=16,
                   lora_targets="q_proj,v_proj", lora_dropout=0.05, lora_dtype="compute", loss="chunked",
                   loss_chunks=2, loss_dtype="compute", modeling="litgpt")
    return TrainingConfig(**{**options, **changes})


@pytest.mark.parametrize("changes", [
    {},  # q and v adapted: zero_pad's index_copy_ keeps the adapters' output; v's view keeps the whole qkv
    {"model": {"num_key_value_heads": 2}, "lora_targets": "all-linear,lm_head"},  # grouped queries, every linear
    # Phi-3: the fused qkv_proj and gate_up_proj as LitGPT's slices and fc_1/fc_2; its window masks in each layer
    {"model": {"model_type": "phi3", "sliding_window": 2047}, "lora_targets": "all-linear,lm_head"},
])
def test_estimate_matches_trace(tmp_path, changes):
    config = _config(tmp_path, **changes)
    estimated = estimate(config).tensor_peak_bytes
    traced = trace(config).budget.tensor_peak_bytes
    assert abs(estimated - traced) <= 0.002 * traced, (estimated, traced)


def test_litgpt_keeps_more_than_transformers(tmp_path):
    """The fused qkv's view and the saved adapters' output: LitGPT's step holds more than transformers' +
    peft's at the same options."""
    config = _config(tmp_path)
    litgpt = estimate(config).tensor_peak_bytes
    hf = estimate(config.model_copy(update={"modeling": "hf"})).tensor_peak_bytes
    assert litgpt > hf


def test_refuses_unmodelled(tmp_path):
    with pytest.raises(InputError, match="modeling"):
        estimate(_config(tmp_path, model={"tie_word_embeddings": True}))
    with pytest.raises(InputError, match="modeling"):
        estimate(_config(tmp_path, quant="nf4"))


def test_stack_sets_it_where_modelled(tmp_path):
    from memtui.engine.model.stacks import stack_defaults

    config = _config(tmp_path)
    given = {"model": config.model, "precision": "bf16-true", "lora_rank": 8, "seq_len": 512}
    assert stack_defaults("litgpt", given)[0]["modeling"] == "litgpt"
    # bf16-mixed (LitGPT's own default precision) is not modelled: transformers' model stands in, with a note
    options, notes = stack_defaults("litgpt", {**given, "precision": "bf16-mixed"})
    assert "modeling" not in options and any("modeling=litgpt not applied" in note for note in notes)
