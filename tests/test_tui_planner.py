"""The planner's rules without widgets: every edit gives a budget, or a field-named error and the last good one."""

from __future__ import annotations

import shutil

from memtui.engine.estimator import estimate
from memtui.engine.telemetry.local_gpu import local_gpu_from_reading
from memtui.engine.model.presets import presets_dir, resolve_recipe
from memtui.engine.model.specs import TrainingConfig
from memtui.tui.planner import LOCAL_GPU, Planner, config_differences


def test_defaults_give_the_default_budget():
    result = Planner().compute()
    assert not result.stale
    assert result.budget == estimate(TrainingConfig())
    assert result.ladder is not None and result.ladder.final.budget == result.budget


def test_a_bad_number_is_refused_with_the_field_and_the_last_budget_kept():
    planner = Planner()
    good = planner.compute()
    planner.set_int_text("batch_size", "0")
    result = planner.compute()
    assert result.stale and result.error_field == "batch_size"
    assert "at least 1" in result.error.message
    assert result.budget == good.budget
    assert planner.options["batch_size"] == 1  # refused, not stored
    planner.set_int_text("batch_size", "")
    assert planner.compute().error.message == "is empty"
    planner.set_int_text("batch_size", "4")
    fixed = planner.compute()
    assert not fixed.stale and fixed.config.batch_size == 4
    assert fixed.budget.per_gpu.activations > good.budget.per_gpu.activations


def test_an_impossible_combination_names_its_flag():
    planner = Planner()
    planner.set_int_text("tp", "3")
    planner.set_int_text("gpus", "3")
    result = planner.compute()
    assert result.error_field == "tp"
    assert "attention heads" in result.error.message
    planner.set_int_text("lora_rank", "16")
    planner.set_int_text("tp", "1")
    planner.set_option("optimizer", "galore-adamw")
    assert planner.compute().error.field == "optimizer"


def test_errors_carry_the_field_and_each_front_end_names_it_its_own_way():
    from memtui.engine.model.options import label

    planner = Planner()
    planner.set_int_text("lora_rank", "x")
    error = planner.compute().error
    assert error.field == "lora_rank"
    assert str(error).startswith("--lora-rank: 'x' is not a whole number")
    assert error.describe(label).startswith("LoRA rank: 'x' is not a whole number")
    planner.set_int_text("lora_rank", "0")
    planner.set_option("offload", "optimizer+params")
    error = planner.compute().error
    assert error.field == "offload" and "--zero 3" in str(error)
    assert error.describe(label) == ("CPU offload: optimizer+params needs ZeRO stage 3 (parameters must be sharded "
                                     "to be offloaded) (allowed: none, optimizer)")


def test_a_config_json_path_loads_or_says_why(tmp_path):
    planner = Planner()
    planner.set_model_path(str(tmp_path / "missing" / "config.json"))
    result = planner.compute()
    assert result.error_field == "model_path" and "no such file" in result.error.message
    folder = tmp_path / "tiny"
    folder.mkdir()
    shutil.copy(presets_dir() / "models" / "gpt2.json", folder / "config.json")
    notes = planner.set_model_path(str(folder))
    result = planner.compute()
    assert not result.stale
    assert result.budget.model.params == 124439808
    assert planner.options["model"] == str(folder)
    assert notes and "1024" in notes[0]  # GPT-2's learned positions clamp the default 2048
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "bert"}')
    planner.set_model_path(str(broken))
    result = planner.compute()
    assert result.error_field == "model_path" and "unsupported architecture" in result.error.message


def test_switching_to_gpt2_clamps_the_sequence_length():
    planner = Planner()
    notes = planner.set_option("model", "gpt2")
    assert planner.options["seq_len"] == 1024
    assert notes and "learned positions" in notes[0]
    assert not planner.compute().stale


def test_a_recipe_applies_over_the_current_options():
    planner = Planner({"model": "llama-3.1-70b", "batch_size": 2})
    planner.set_int_text("seq_len", "abc")
    planner.apply_recipe(resolve_recipe("qlora-24gb"))
    result = planner.compute()
    assert not result.stale  # a recipe resets refused fields
    assert result.config.quant == "nf4" and result.config.gpu == "rtx-4090"
    assert result.config.model == "llama-3.1-70b" and result.config.batch_size == 2


def test_the_local_gpu_brings_its_real_capacity():
    local = local_gpu_from_reading("NVIDIA GeForce RTX 4090", 25757220864 - 2**28)
    planner = Planner()
    planner.set_local_gpu(local, select=True)
    assert planner.gpu_choice == LOCAL_GPU
    result = planner.compute()
    assert result.budget.gpu.memory_bytes == 25757220864 - 2**28
    assert result.config.gpu == "rtx-4090"
    planner.set_option("gpu", "rtx-4090")  # the preset, not this machine
    assert planner.compute().budget.gpu.memory_bytes == 25757220864
    planner.set_option("gpu", LOCAL_GPU)
    assert planner.compute().budget.gpu.memory_bytes == 25757220864 - 2**28


def test_pin_and_differences():
    planner = Planner()
    planner.compute()
    assert planner.toggle_pin() is True
    planner.set_option("checkpointing", "full")
    result = planner.compute()
    assert config_differences(planner.pinned.config, result.config) == [("checkpointing", "none", "full")]
    assert planner.toggle_pin() is False and planner.pinned is None


def test_every_estimator_option_has_an_input_a_one_line_summary_and_an_explainer():
    from memtui.engine.planning.ladder import _rungs
    from memtui.tui.explain import EXPLAINERS
    from memtui.tui.option_specs import OPTION_SPECS
    from memtui.tui.widgets.ladder_view import step_explainer_key

    assert set(TrainingConfig.model_fields) <= set(OPTION_SPECS)  # nothing the CLI takes is missing here
    for spec in OPTION_SPECS.values():
        assert 0 < len(spec.summary) <= 40, spec.key  # one line beside the option in the wide layout
        explainer = EXPLAINERS[spec.explainer]
        markdown = explainer.markdown()
        for section in ("## What it does", "## What it costs", "## When to use it"):
            assert section in markdown, (spec.key, section)
    # Every rung the ladder can show explains itself.
    everything = TrainingConfig(precision="bf16-true", master_weights=True, optimizer="galore-adamw",
                                optimizer_impl="fused", lora_rank=16, quant="nf4", tp=2, pp=2, gpus=8, zero=3, batch_size=2, microbatches=2,
                                offload="optimizer+params", attention="flash", checkpointing="full")
    for rung in _rungs(everything):
        assert rung.key in EXPLAINERS
    assert step_explainer_key(Planner().compute().ladder.baseline) in EXPLAINERS


def test_a_number_above_its_bound_is_refused_with_the_bound():
    planner = Planner()
    good = planner.compute().budget
    bound = next(item.le for item in TrainingConfig.model_fields["gpus"].metadata if hasattr(item, "le"))
    planner.set_int_text("gpus", str(bound + 1))
    result = planner.compute()
    assert result.error_field == "gpus" and result.budget == good
    assert str(result.error) == f"--gpus: must be at most {bound:,}, got {bound + 1:,}"
    planner.set_int_text("gpus", "8")
    assert not planner.compute().stale
