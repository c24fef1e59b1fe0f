"""Export: Markdown for people, and exactly `memtui estimate --json` for programs."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

from memtui.cli import main
from memtui.engine.estimator import estimate
from memtui.engine.planning.export import budget_markdown, export_budget, export_dir
from memtui.engine.planning.ladder import savings_ladder
from memtui.engine.model.presets import presets_dir
from memtui.engine.model.specs import TrainingConfig

NOW = datetime(2026, 1, 2, 3, 4, 5)


def test_json_is_byte_for_byte_what_estimate_json_prints(tmp_path, capsys):
    argv = ["estimate", "--model", "llama-3.1-70b", "--recipe", "qlora-24gb", "--json"]
    assert main(argv) == 0
    cli_text = capsys.readouterr().out
    config = TrainingConfig(model="llama-3.1-70b", gpu="rtx-4090", gpus=1, precision="bf16-mixed", quant="nf4",
                            lora_rank=16, lora_targets="all-linear", checkpointing="full", attention="flash", zero=0)
    paths = export_budget(estimate(config), directory=tmp_path, now=NOW)
    assert paths.json.read_text(encoding="utf-8") == cli_text
    assert json.loads(cli_text)["config"]["quant"] == "nf4"


def test_markdown_has_verdict_configuration_components_timeline_and_ladder(tmp_path):
    config = TrainingConfig(model="llama-3.1-8b", gpu="rtx-4090", precision="bf16-true", lora_rank=16,
                            lora_targets="all-linear", quant="nf4", checkpointing="full")
    budget = estimate(config)
    ladder = savings_ladder(config)
    text = budget_markdown(budget, ladder=ladder, title="Llama 3.1 8B on 1x GeForce RTX 4090")
    assert text.startswith("# memtui budget: Llama 3.1 8B on 1x GeForce RTX 4090\n")
    assert ("**Fits**" if budget.fits else "**Does not fit**") in text
    assert "| quant | `nf4` |" in text
    for label in ("Weights", "Gradients", "Optimizer states", "Activations", "Temporaries", "CUDA overhead"):
        assert f"| {label} |" in text
    assert f"| **Device peak** | **{budget.device_peak_bytes / 2**30:,.2f}** |" in text
    for point in budget.timeline:
        assert f"| {point.phase} | {point.bytes / 2**30:,.2f} |" in text
    assert "## Savings ladder" in text
    for step in ladder.steps:
        assert f"| {step.label} |" in text
    assert f"{budget.bytes_per_param:.2f} bytes per parameter" in text


def test_files_are_named_for_model_gpu_and_time_and_never_overwrite(tmp_path):
    budget = estimate(TrainingConfig(model="gpt2", gpu="t4", seq_len=1024))
    first = export_budget(budget, directory=tmp_path, now=NOW)
    second = export_budget(budget, directory=tmp_path, now=NOW)
    assert first.markdown.name == "memtui-gpt2-t4-20260102-030405.md"
    assert first.json.name == "memtui-gpt2-t4-20260102-030405.json"
    assert second.markdown.name == "memtui-gpt2-t4-20260102-030405-2.md"
    assert first.markdown.exists() and second.json.exists()


def test_export_directory_from_the_environment_or_under_the_current_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUI_EXPORT_DIR", str(tmp_path / "custom"))
    assert export_dir() == tmp_path / "custom"
    paths = export_budget(estimate(TrainingConfig(model="gpt2", seq_len=1024)), now=NOW)
    assert paths.json.parent == tmp_path / "custom"
    monkeypatch.delenv("MEMTUI_EXPORT_DIR")
    monkeypatch.chdir(tmp_path)
    assert export_dir() == tmp_path / "memtui-exports"


def test_a_model_given_as_a_path_makes_a_safe_file_name(tmp_path):
    folder = tmp_path / "My Model (v2)"
    folder.mkdir()
    shutil.copy(presets_dir() / "models" / "gpt2.json", folder / "config.json")
    budget = estimate(TrainingConfig(model=str(folder / "config.json"), seq_len=1024))
    paths = export_budget(budget, directory=tmp_path / "out", now=NOW)
    assert paths.markdown.parent == tmp_path / "out"
    assert "/" not in paths.markdown.name and " " not in paths.markdown.name
    assert paths.markdown.name.startswith("memtui-my-model-v2-")
