"""The savings ladder: from 16 bytes/param to the current configuration, one optimization at a time."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memtui.engine.planning.ladder as ladder_module
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.planning.ladder import BASELINE_OPTIONS, COSTS_MEMORY, baseline_config, savings_ladder
from memtui.engine.model.presets import resolve_recipe
from memtui.engine.model.specs import COMPONENT_NAMES, TrainingConfig


def recipe_config(recipe_id: str, **overrides) -> TrainingConfig:
    options = dict(resolve_recipe(recipe_id).options)
    options.update(overrides)
    return TrainingConfig(**options)


def test_baseline_is_sixteen_bytes_per_parameter_whatever_the_configuration():
    config = recipe_config("qlora-24gb", model="llama-3.1-70b")
    ladder = savings_ladder(config)
    baseline = ladder.baseline
    assert baseline.is_baseline
    assert baseline.budget.bytes_per_param == 16.0
    assert baseline.config.precision == "32-true" and baseline.config.optimizer == "adamw"
    assert baseline.config.lora_rank == 0 and baseline.config.quant == "none"
    # The workload is not an optimization: it stays.
    assert (baseline.config.model, baseline.config.batch_size, baseline.config.seq_len) == (
        config.model, config.batch_size, config.seq_len)


def test_last_rung_is_the_current_configuration_exactly():
    config = recipe_config("qlora-24gb", model="llama-3.1-70b")
    ladder = savings_ladder(config)
    assert ladder.final.config == config
    assert ladder.final.budget == estimate(config)


def test_qlora_rungs_in_order_and_what_each_removes():
    config = recipe_config("qlora-24gb", model="llama-3.1-70b")
    ladder = savings_ladder(config)
    assert [step.keys for step in ladder.steps] == [
        ("baseline",), ("precision",), ("lora_rank",), ("quant",), ("attention",), ("checkpointing",)]
    previous = ladder.baseline.budget
    for step in ladder.steps[1:]:
        before, after = previous.per_gpu.model_dump(), step.budget.per_gpu.model_dump()
        assert step.removed == {name: before[name] - after[name] for name in COMPONENT_NAMES}
        assert step.removed_total == previous.device_peak_bytes - step.budget.device_peak_bytes
        # Components add up to the device peak up to the allocator's 512-byte rounding.
        assert abs(sum(step.removed.values()) - step.removed_total) < 1024
        previous = step.budget
    assert ladder.removed_total == ladder.baseline.budget.device_peak_bytes - ladder.final.budget.device_peak_bytes
    # LoRA drops gradients and optimizer states of the frozen base; NF4 then shrinks the weights.
    lora, nf4 = ladder.steps[2], ladder.steps[3]
    assert lora.budget.model_states.gradients < ladder.steps[1].budget.model_states.gradients / 100
    assert nf4.budget.model_states.weights < lora.budget.model_states.weights / 4
    # The workshop story: 16 bytes per parameter down to under 1.
    assert ladder.final.budget.bytes_per_param < 1


def test_an_unoptimized_configuration_has_only_the_baseline():
    config = TrainingConfig(model="gpt2", seq_len=1024, **BASELINE_OPTIONS)
    ladder = savings_ladder(config)
    assert len(ladder.steps) == 1
    assert ladder.final.budget == estimate(config)


def test_master_weights_travel_with_their_precision():
    config = recipe_config("megatron-pretrain", model="llama-3.1-8b")
    ladder = savings_ladder(config)
    precision_step = ladder.steps[1]
    assert precision_step.keys == ("precision",)
    assert precision_step.config.master_weights is True and precision_step.config.precision == "bf16-true"
    assert "master" in precision_step.label
    # The fp32 master copy brings model states right back to 16 bytes/param before sharding.
    assert precision_step.budget.bytes_per_param == pytest.approx(16.0)
    assert [step.keys[0] for step in ladder.steps[2:]] == ["tp", "zero", "attention", "checkpointing"]


def test_offload_comes_after_the_zero_stage_it_needs():
    config = recipe_config("zero3-offload", model="llama-3.1-8b", gpus=8)
    keys = [step.keys for step in savings_ladder(config).steps]
    assert keys.index(("zero",)) < keys.index(("offload",))


def test_a_rung_invalid_alone_is_applied_with_the_next(monkeypatch):
    """If the order ever puts quantization before LoRA, the two are applied together, not skipped."""
    original = ladder_module._rungs

    def quant_first(config):
        rungs = original(config)
        quant = next(rung for rung in rungs if rung.key == "quant")
        rungs.remove(quant)
        lora_index = next(i for i, rung in enumerate(rungs) if rung.key == "lora_rank")
        rungs.insert(lora_index, quant)
        return rungs

    monkeypatch.setattr(ladder_module, "_rungs", quant_first)
    config = recipe_config("qlora-24gb", model="llama-3.1-8b")
    with pytest.raises(InputError):  # the premise: NF4 without LoRA is invalid
        estimate(config.model_copy(update={"lora_rank": 0}))
    ladder = savings_ladder(config)
    merged = [step for step in ladder.steps if "quant" in step.keys]
    assert len(merged) == 1 and merged[0].keys == ("quant", "lora_rank")
    assert " + " in merged[0].label
    assert ladder.final.budget == estimate(config)


def test_an_invalid_configuration_raises_input_error():
    config = TrainingConfig(model="llama-3.1-8b", tp=3, gpus=3)
    with pytest.raises(InputError) as error:
        savings_ladder(config)
    assert error.value.field == "tp"


def test_baseline_config_changes_only_optimizations():
    config = recipe_config("qlora-24gb", model="llama-3.1-8b", batch_size=4, seq_len=512)
    base = baseline_config(config)
    for key, value in config.model_dump().items():
        expected = BASELINE_OPTIONS.get(key, value)
        assert getattr(base, key) == expected, key


OPTION_STRATEGY = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gpt2", "llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b"]),
        "gpus": st.sampled_from([1, 2, 8]),
        "batch_size": st.integers(1, 8),
        "seq_len": st.sampled_from([128, 512, 1024]),
        "precision": st.sampled_from(["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]),
        "master_weights": st.booleans(),
        "optimizer": st.sampled_from(["adamw", "adamw-8bit", "sgd", "sgd-momentum", "adafactor", "lion", "galore-adamw"]),
        "optimizer_impl": st.sampled_from(["foreach", "fused", "for-loop"]),
        "checkpointing": st.sampled_from(["none", "selective", "full"]),
        "attention": st.sampled_from(["eager", "flash"]),
        "zero": st.integers(0, 3),
        "offload": st.sampled_from(["none", "optimizer", "optimizer+params"]),
        "tp": st.sampled_from([1, 2]),
        "lora_rank": st.sampled_from([0, 8]),
        "lora_targets": st.sampled_from(["all-linear"]),
        "quant": st.sampled_from(["none", "int8", "nf4"]),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(OPTION_STRATEGY)
def test_any_valid_configuration_ladders_down_to_itself(options):
    config = TrainingConfig(**options)
    try:
        expected = estimate(config)
    except InputError:
        return  # invalid combinations are the estimator's to refuse
    ladder = savings_ladder(config)
    assert ladder.final.config == config
    assert ladder.final.budget == expected
    assert ladder.baseline.budget.bytes_per_param == 16.0
    assert sum(step.removed_total for step in ladder.steps) == ladder.removed_total
    for step in ladder.steps[1:]:
        assert step.label.endswith(COSTS_MEMORY) == (step.removed_total < 0), step.label


def test_a_rung_that_adds_memory_is_labelled_a_cost():
    """From fp32 weights, autocast adds its 16-bit weight copies before it halves any activation."""
    config = TrainingConfig(model="llama-3.2-1b", precision="16-mixed", attention="flash", optimizer="adamw-8bit", seq_len=2048)
    precision = next(step for step in savings_ladder(config).steps if step.keys == ("precision",))
    assert precision.removed_total < 0
    assert precision.label == "fp16 mixed precision (autocast)" + COSTS_MEMORY
