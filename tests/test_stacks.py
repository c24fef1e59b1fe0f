"""--stack: each training framework's memory defaults, with their sources, under everything typed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from memtui.cli import main
from memtui.cli.options import add_training_flags, config_from_args, file_notes
from memtui.engine.model.framework_configs import read_framework_config
from memtui.engine.model.presets import resolve_recipe
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.stacks import STACK_IDS, STACKS, Derived, stack_defaults, stacks_markdown
from memtui.tui.planner import Planner

ROOT = Path(__file__).resolve().parent.parent


def resolve(*argv: str) -> tuple[TrainingConfig, list[str]]:
    """The configuration the command line makes of these flags, and the notes it keeps."""
    parser = argparse.ArgumentParser()
    add_training_flags(parser)
    args = parser.parse_args(list(argv))
    return config_from_args(args), file_notes(args)


def picked(config: TrainingConfig, expected: dict) -> dict:
    return {field: getattr(config, field) for field in expected}


# Each stack on Llama 3.2 1B, one GPU, full fine-tuning: the values docs/stacks.md cites.
RESOLVED = {
    "hf": {"batch_size": 8, "grad_accum": 1, "precision": "bf16-true", "checkpointing": "none",
           "optimizer": "adamw", "optimizer_impl": "fused", "loss": "standard", "activation_offload": False},
    "trl": {"batch_size": 8, "seq_len": 1024, "precision": "bf16-mixed", "checkpointing": "full",
            "optimizer_impl": "fused", "loss": "fused-linear"},
    "torchtune": {"precision": "bf16-true", "checkpointing": "none", "optimizer_impl": "fused", "loss": "chunked",
                  "loss_chunks": 8, "optimizer_in_backward": False, "batch_size": 1},
    "litgpt": {"precision": "bf16-mixed", "batch_size": 1, "grad_accum": 16, "optimizer_impl": "foreach",
               "checkpointing": "none", "zero": 0, "loss": "chunked", "loss_chunks": 16},
    "lightning": {"precision": "32-true", "grad_accum": 1, "batch_size": 1, "checkpointing": "none",
                  "optimizer_impl": "foreach"},
    "torchtitan": {"batch_size": 8, "seq_len": 2048, "precision": "bf16-mixed", "checkpointing": "selective",
                   "optimizer_impl": "fused", "loss": "standard"},
    "axolotl": {"batch_size": 1, "seq_len": 512, "precision": "bf16-true", "checkpointing": "none",
                "optimizer_impl": "fused", "loss": "standard"},
}


@pytest.mark.parametrize("stack", STACK_IDS)
def test_each_stack_resolves_to_its_frameworks_defaults(stack):
    config, _ = resolve("--stack", stack, "--model", "llama-3.2-1b")
    assert config.stack == stack
    assert picked(config, RESOLVED[stack]) == RESOLVED[stack]


@pytest.mark.parametrize(("argv", "expected"), [
    # LoRA turns on each stack's adapter defaults: LitGPT's and torchtune's adapters in the compute dtype.
    (["--stack", "litgpt", "--lora-rank", "8"], {"lora_dropout": 0.05, "lora_dtype": "compute"}),
    (["--stack", "torchtune", "--lora-rank", "8"], {"lora_dropout": 0.0, "lora_dtype": "compute"}),
    (["--stack", "hf", "--lora-rank", "8"], {"lora_dropout": 0.0, "lora_dtype": "fp32"}),
    # TRL casts a quantized model's adapters to bf16 and no longer runs k-bit prep; Axolotl's casts undo it.
    (["--stack", "trl", "--lora-rank", "8", "--quant", "nf4"],
     {"lora_dropout": 0.05, "lora_dtype": "compute", "kbit_prep": False}),
    (["--stack", "axolotl", "--lora-rank", "8", "--quant", "nf4"], {"lora_dtype": "fp32", "kbit_prep": False}),
    # TRL's bf16 adapters under fp16 autocast would be fp16 in memtui, which the GradScaler refuses: not applied.
    (["--stack", "trl", "--lora-rank", "8", "--quant", "nf4", "--precision", "16-mixed"], {"lora_dtype": "fp32"}),
    # LitGPT refuses quantize with a mixed precision; on several GPUs it shards with each block checkpointed.
    (["--stack", "litgpt", "--lora-rank", "8", "--quant", "nf4"], {"precision": "bf16-true"}),
    (["--stack", "litgpt", "--gpus", "4"],
     {"zero": 3, "checkpointing": "full", "grad_accum": 4, "loss": "standard"}),
    (["--stack", "litgpt", "--batch-size", "4", "--seq-len", "4096"], {"grad_accum": 4, "loss_chunks": 32}),
    (["--stack", "torchtitan", "--gpus", "8"], {"zero": 3}),
    (["--stack", "torchtune", "--loss", "standard"], {"loss": "standard", "loss_chunks": 8}),
])
def test_a_stacks_defaults_follow_the_options_they_depend_on(argv, expected):
    config, _ = resolve("--model", "llama-3.2-1b", *argv)
    assert picked(config, expected) == expected


def test_flags_a_recipe_and_a_file_override_a_stack():
    config, _ = resolve("--stack", "trl", "--checkpointing", "none", "--batch-size", "2", "--no-kbit-prep")
    assert (config.checkpointing, config.batch_size, config.precision) == ("none", 2, "bf16-mixed")
    config, _ = resolve("--stack", "litgpt", "--recipe", "qlora-24gb")
    recipe = dict(resolve_recipe("qlora-24gb").options)
    assert picked(config, recipe) == recipe and config.stack == "litgpt"
    # A TRL file under LitGPT's stack: the file's keys win, the stack fills what the file leaves out.
    path = ROOT / "tests/data/frameworks/trl_sft_qwen2_5_0_5b.json"
    from_file = read_framework_config(path).options
    config, notes = resolve("--stack", "litgpt", "--from", str(path))
    assert picked(config, from_file) == from_file
    assert "loss" not in from_file and "lora_dtype" not in from_file
    assert (config.loss, config.loss_chunks, config.lora_dtype) == ("chunked", 1024 // 128, "compute")
    assert any(note.startswith("from trl_sft_qwen2_5_0_5b.json") for note in notes)


def test_a_bad_stack_is_one_line_naming_the_flag_and_the_stacks(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", "--stack", "megatron"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("memtui: error: --stack: 'megatron' is not a valid choice (allowed: none, hf, trl, "
                          "torchtune, litgpt, lightning, torchtitan, axolotl)")


def test_what_memtui_cannot_apply_or_model_is_in_the_notes(capsys):
    # LitGPT on a 4-bit base trains in bf16-true, where its chunked cross-entropy runs in bf16 (--loss-dtype compute).
    assert main(["estimate", "--stack", "litgpt", "--model", "llama-3.2-1b", "--lora-rank", "8", "--quant", "nf4",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    notes = data["notes"]
    assert data["config"]["loss_dtype"] == "compute" and not any(note.startswith("not modelled yet") for note in notes)
    assert "--stack litgpt: the head runs on 128-token chunks (--loss chunked, one chunk per 128 tokens)" in notes
    # torchtune's chunked loss on several GPUs is not applied, and said so; torchtitan's SAC is always said.
    _, notes = resolve("--stack", "torchtune", "--gpus", "2", "--zero", "3")
    assert "--stack torchtune: loss=chunked not applied (memtui models it on one GPU only)" in notes
    _, notes = resolve("--stack", "torchtitan")
    assert any(note.startswith("not modelled yet: activation_checkpoint.selective_ac_option=\"2\"") for note in notes)
    _, notes = resolve("--stack", "trl", "--model", "gemma-2-9b")
    assert any("loss=fused-linear not applied (the model soft-caps its logits" in note for note in notes)
    assert resolve("--model", "llama-3.2-1b")[1] == []  # no stack, no notes


def test_every_default_is_a_valid_value_of_its_option_with_a_source():
    view = TrainingConfig().model_dump()
    for stack in STACKS.values():
        assert stack.repository.count("/") == 1 and len(stack.commit) == 40 and stack.date
        for default in stack.defaults:
            assert default.source, (stack.id, default.field)
            value = default.value.compute(view) if isinstance(default.value, Derived) else default.value
            TrainingConfig.model_validate({default.field: value})  # the field exists and takes the value
    assert set(STACKS) == set(STACK_IDS)


def test_from_file_assumes_the_stack_tables_values_for_keys_it_leaves_out(tmp_path):
    toml = tmp_path / "titan.toml"
    toml.write_text('[model]\nname = "llama3"\nflavor = "8B"\n')
    options = read_framework_config(toml).options
    titan = STACKS["torchtitan"]
    for field in ("batch_size", "seq_len", "precision", "checkpointing", "optimizer_impl"):
        assert options[field] == titan.value(field), field
    litgpt = tmp_path / "lora.yaml"
    litgpt.write_text("checkpoint_dir: meta-llama/Llama-3.2-1B\nlora_r: 8\ntrain:\n  micro_batch_size: 1\n")
    options = read_framework_config(litgpt).options
    assert (options["lora_dropout"], options["lora_dtype"]) == (STACKS["litgpt"].value("lora_dropout"),
                                                                 STACKS["litgpt"].default("lora_dtype").value)
    assert stack_defaults("litgpt", {"lora_rank": 8})[0]["lora_dropout"] == options["lora_dropout"]


def test_docs_stacks_md_is_the_table():
    text = (ROOT / "docs/stacks.md").read_text(encoding="utf-8")
    assert stacks_markdown() in text, "regenerate: python -m memtui.engine.model.stacks"


def test_choosing_a_stack_in_the_planner_replaces_the_previous_ones_options():
    planner = Planner({"model": "llama-3.2-1b", "lora_rank": 8, "seq_len": 4096})
    notes = planner.set_option("stack", "trl")
    assert notes[0].startswith("TRL SFTTrainer's defaults: batch_size 8")
    assert planner.compute(ladder=False).config.checkpointing == "full"
    planner.set_option("stack", "litgpt")  # TRL's seq_len goes back to memtui's; LitGPT sets none
    config = planner.compute(ladder=False).config
    assert (config.stack, config.seq_len, config.batch_size, config.checkpointing, config.lora_dtype) == (
        "litgpt", 2048, 1, "none", "compute")
    assert config.loss_chunks == 16 and config.lora_rank == 8  # what no stack sets stays
    planner.set_option("stack", "none")
    config = planner.compute(ladder=False).config
    defaults = TrainingConfig()
    assert (config.grad_accum, config.loss, config.lora_dtype) == (defaults.grad_accum, defaults.loss, "fp32")


@pytest.mark.anyio
async def test_the_planners_stack_select_sets_the_inputs_and_explains_its_sources():
    from textual.widgets import Select

    from memtui.tui.screens.explain_screen import ExplainScreen
    from tests.test_tui_app import WIDE, choose, make_app, ready

    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await choose(pilot, "stack", "trl")
        assert app.query_one("#opt-checkpointing", Select).value == "full"
        assert app.query_one("#opt-precision", Select).value == "bf16-mixed"
        assert app.result.config.stack == "trl" and app.result.config.batch_size == 8 and not app.result.stale
        app.query_one("#opt-stack", Select).focus()
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, ExplainScreen)
        assert "trl/trainer/base_config.py:61 gradient_checkpointing default=True" in app.screen.markdown


def test_presets_and_the_help_list_the_stacks(capsys):
    assert main(["presets", "stacks", "--json"]) == 0
    stacks = json.loads(capsys.readouterr().out)["stacks"]
    assert [stack["id"] for stack in stacks] == list(STACK_IDS)
    litgpt = next(stack for stack in stacks if stack["id"] == "litgpt")
    grad_accum = next(default for default in litgpt["defaults"] if default["field"] == "grad_accum")
    assert grad_accum["value"] == "16 / GPUs / batch" and "global_batch_size=16" in grad_accum["source"]
    assert main(["presets", "stacks"]) == 0
    assert "torchtitan" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "none, hf, trl, torchtune, litgpt, lightning, torchtitan, axolotl (default none)" in help_text
