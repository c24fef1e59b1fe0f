"""Each training option declared once (memtui.engine.model.options): everything else derives from it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from memtui.cli import main
from memtui.cli.options import add_training_flags
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.model import validation
from memtui.engine.model.options import OPTIONS, flag_table_rows, label
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.planning.ladder import BASELINE_OPTIONS, savings_ladder
from memtui.tui.explain import EXPLAINERS, OPTION_KEYS
from memtui.tui.option_specs import GROUPS, OPTION_SPECS

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_flag_rows() -> list[str]:
    """The rows of README's "Flags" table (the first table after the heading)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n\n| flag |", 1)[1].split("\n\n", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| `--")]


def test_one_entry_per_training_config_field():
    assert set(OPTIONS) == set(TrainingConfig.model_fields)
    for field, option in OPTIONS.items():
        assert option.field == field and option.label and option.help and option.flag in option.example
        assert option.explainer_key in EXPLAINERS, field
        if option.kind == "select":
            assert option.default == option.from_text(str(option.default)) and str(option.default) in option.choices
        if option.kind == "int":
            assert option.minimum is not None, field  # bounds come from TrainingConfig's Field


def test_readme_flag_table_is_the_registry():
    rows = readme_flag_rows()
    generated = flag_table_rows()
    assert [row for row in rows if row in generated] == generated, "regenerate: python -m memtui.engine.model.options"
    others = [row for row in rows if row not in generated]
    assert [row.split("`")[1] for row in others] == ["--recipe", "--from"]  # the flags that are not config fields


def test_cli_flags_come_from_the_registry():
    parser = argparse.ArgumentParser()
    add_training_flags(parser)
    flags = {action.option_strings[0] for action in parser._actions if action.option_strings}
    assert flags == {option.flag for option in OPTIONS.values()} | {"-h", "--recipe", "--from"}
    for option in OPTIONS.values():
        if option.kind == "int":
            with pytest.raises(SystemExit):
                parser.parse_args([option.flag, str(option.minimum - 1)])


def test_planner_inputs_groups_and_explainers_come_from_the_registry():
    assert [title for title, _ in GROUPS] == list(dict.fromkeys(option.group for option in OPTIONS.values()))
    for field, option in OPTIONS.items():
        spec = OPTION_SPECS[field]
        assert (spec.label, spec.kind, spec.choices, spec.explainer) == (
            option.label, option.kind, option.choices, option.explainer_key)
    assert set(OPTION_SPECS) - set(OPTIONS) == {"model_path"}
    assert OPTION_KEYS == tuple(option.explainer_key for option in OPTIONS.values())


def test_ladder_labels_and_baseline_come_from_the_registry():
    config = TrainingConfig(precision="bf16-true", master_weights=True, optimizer="adamw-8bit", lora_rank=16,
                            quant="nf4", checkpointing="full", gpus=2, zero=3)
    assert BASELINE_OPTIONS["precision"] == OPTIONS["precision"].baseline == "32-true"
    labels = [step.label for step in savings_ladder(config).steps[1:]]
    assert "bf16 weights and gradients + fp32 master copy (costs memory here)" in labels  # same 16 B/param, plus casts
    assert "LoRA rank 16 (q_proj,v_proj)" in labels
    assert "ZeRO-3 / FSDP: + weights sharded over 2 ranks" in labels


def test_an_error_carries_the_field_and_each_front_end_names_it():
    error = InputError("offload", "optimizer+params needs {zero} 3", "none, optimizer", fields=("zero",))
    assert error.fields == ("offload", "zero")
    assert str(error) == "--offload: optimizer+params needs --zero 3 (allowed: none, optimizer)"
    assert error.describe(label) == "CPU offload: optimizer+params needs ZeRO stage 3 (allowed: none, optimizer)"


def test_check_config_is_a_table_of_rules_over_named_fields():
    for rule in validation.RULES:
        assert rule.fields and all(field in OPTIONS for field in rule.fields)


def test_lora_targets_are_parsed_once_per_config(monkeypatch):
    calls = []
    original = str.split

    class CountingTargets(str):
        def split(self, *args, **kwargs):
            calls.append(args)
            return original(self, *args, **kwargs)

    validation._lora_targets.cache_clear()
    config = TrainingConfig(lora_rank=16).model_copy(update={"lora_targets": CountingTargets("q_proj,v_proj")})
    estimate(config)
    estimate(config)
    assert len(calls) == 1


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--tp", "2", "--gpus", "1"], "memtui: error: --tp: --tp 2 x --pp 1 needs 2 GPUs; --gpus is 1"),
    (["--tp", "4", "--pp", "2", "--gpus", "4"], "memtui: error: --tp: --tp 4 x --pp 2 needs 8 GPUs; --gpus is 4"),
    (["--pp", "4", "--gpus", "2"], "memtui: error: --pp: 4 stages need 4 GPUs; --gpus is 2"),
    (["--tp", "2", "--gpus", "3"], "memtui: error: --gpus: 3 is not a multiple of --tp x --pp = 2"),
])
def test_tp_and_pp_overflow_names_tp_or_pp_not_gpus(capsys, argv, expected):
    code, err = run_cli(capsys, "estimate", *argv)
    assert code == 2 and err.startswith(expected) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("capacity", ["inf", "1e-30", "nan", "0"])
def test_run_capacity_is_refused_in_one_line_naming_capacity(capsys, capacity):
    code, err = run_cli(capsys, "run", "--model", "gpt2", "--device", "cpu", "--capacity", capacity)
    assert code == 2 and err.startswith("memtui: error: --capacity: ") and len(err.strip().splitlines()) == 1, err
    assert "--capacity-bytes" not in err and "Traceback" not in err
