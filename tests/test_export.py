"""Export: Markdown for people, and exactly `memtui estimate --json` for programs."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest

from memtui.cli import main
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.live.lock import RunLock
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
    from memtui.engine.estimator.reserved import with_reserved
    from memtui.engine.model.presets import resolve_gpu, resolve_model

    budget = with_reserved(estimate(config), config, resolve_model(config.model), resolve_gpu(config.gpu))
    paths = export_budget(budget, directory=tmp_path, now=NOW)
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


UNUSABLE_DIRECTORIES = {
    "a file": lambda tmp_path: _a_file(tmp_path),
    "/proc": lambda tmp_path: "/proc",
    "no such user": lambda tmp_path: "~nosuchuser-memtui/exports",
}


def _a_file(tmp_path):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    return str(path)


@pytest.mark.parametrize("kind", UNUSABLE_DIRECTORIES)
def test_an_unusable_export_directory_is_one_error_naming_the_variable(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("MEMTUI_EXPORT_DIR", UNUSABLE_DIRECTORIES[kind](tmp_path))
    with pytest.raises(InputError, match=r"^MEMTUI_EXPORT_DIR: cannot ") as error:
        export_budget(estimate(TrainingConfig(model="gpt2", seq_len=1024)), now=NOW)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", UNUSABLE_DIRECTORIES)
def test_an_unusable_lock_directory_is_one_error_naming_the_variable(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("MEMTUI_LOCK_DIR", UNUSABLE_DIRECTORIES[kind](tmp_path))
    with pytest.raises(InputError, match=r"^MEMTUI_LOCK_DIR: cannot ") as error:
        RunLock().acquire()
    assert "\n" not in str(error.value)


def test_run_with_an_unusable_lock_directory_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMTUI_LOCK_DIR", "~nosuchuser-memtui/locks")
    code = main(["run", "--model", "gpt2", "--device", "cpu", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "MEMTUI_LOCK_DIR" in err, err


@pytest.mark.anyio
async def test_e_with_an_unusable_export_directory_notifies_and_the_app_keeps_running(monkeypatch):
    from memtui.tui.app import MemtuiApp

    monkeypatch.setenv("MEMTUI_EXPORT_DIR", "~nosuchuser-memtui/exports")
    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(200):
            if app.result is not None and app.result.budget is not None and not app.result.stale:
                break
            await pilot.pause(0.01)
        app.set_focus(None)  # the key goes to the app, not to an input
        await pilot.press("e")
        await pilot.pause()
        assert app.is_running and app.last_export is None
        messages = [str(notification.message) for notification in app._notifications]
        assert any("MEMTUI_EXPORT_DIR: cannot expand" in message for message in messages), messages
