"""Hub ids as models: `--model org/name` from a prepared Hugging Face cache, offline; nothing is ever fetched."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from textual.command import CommandPalette
from textual.widgets import Input, Select

from memtui.cli import main
from memtui.engine.errors import InputError
from memtui.engine.model import hub, presets
from memtui.engine.model.presets import presets_dir, resolve_model
from tests.test_tui_app import WIDE, make_app, note, ready, row, settled

HUB_ID = "Qwen/Qwen2.5-0.5B"
QWEN_PARAMS = 494032768  # the released checkpoint's count, as for the preset
ROOT = Path(__file__).resolve().parents[1]


def add_to_cache(hub_cache: Path, repo_id: str, config: dict, revision: str = "a" * 40, *,
                 main: bool = True) -> Path:
    """One repository as huggingface_hub lays it out: blobs, snapshots/<revision>/config.json, refs/main."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / f"{revision[:8]}-config"
    snapshot = repo / "snapshots" / revision / "config.json"
    blob.parent.mkdir(parents=True, exist_ok=True)
    snapshot.parent.mkdir(parents=True)
    blob.write_text(json.dumps(config), encoding="utf-8")
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    return snapshot


def qwen_config(**changes) -> dict:
    config = json.loads((presets_dir() / "models" / "qwen2.5-0.5b.json").read_text(encoding="utf-8"))
    config.pop("_memtui", None)  # a Hub config carries no memtui name
    return {**config, **changes}


def no_downloads(*args, **kwargs):
    raise AssertionError(f"a download was attempted: {args} {kwargs}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME in tmp_path, offline, with Qwen/Qwen2.5-0.5B cached; any download or connection fails the test."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    add_to_cache(cache, HUB_ID, qwen_config())
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_downloads)
    monkeypatch.setattr(socket.socket, "connect", no_downloads)
    return cache


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_estimate_from_a_hub_id_in_the_cache(hub_cache, capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", HUB_ID, "--gpu", "t4", "--json")
    assert code == 0
    from_hub = json.loads(out)
    assert from_hub["model"]["id"] == HUB_ID and from_hub["model"]["params"] == QWEN_PARAMS
    # The same config.json as the preset: the same budget, component by component.
    _, out, _ = run_cli(capsys, "estimate", "--model", "qwen2.5-0.5b", "--gpu", "t4", "--json")
    from_preset = json.loads(out)
    for key in ("per_gpu", "device_peak_bytes", "tensor_peak_bytes"):
        assert from_hub[key] == from_preset[key], key


def test_hf_hub_cache_wins_over_hf_home(hub_cache, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    add_to_cache(elsewhere, HUB_ID, qwen_config(num_hidden_layers=2))
    monkeypatch.setenv("HF_HUB_CACHE", str(elsewhere))
    assert resolve_model(HUB_ID).num_layers == 2
    monkeypatch.delenv("HF_HUB_CACHE")
    assert resolve_model(HUB_ID).num_layers == 24


def test_the_revision_is_the_one_refs_main_names(hub_cache):
    add_to_cache(hub_cache, "org/two-revisions", qwen_config(num_hidden_layers=3), "b" * 40, main=False)
    add_to_cache(hub_cache, "org/two-revisions", qwen_config(num_hidden_layers=5), "c" * 40)
    spec = resolve_model("org/two-revisions")
    assert spec.id == spec.name == "org/two-revisions" and spec.num_layers == 5


def test_an_id_not_in_the_cache_is_one_line_naming_the_ways_out(hub_cache, capsys):
    code, out, err = run_cli(capsys, "estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "t4")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("memtui: error: --model: 'meta-llama/Llama-3.1-8B'")
    assert "--model PATH" in err and "HF_TOKEN" in err and "HF_HUB_OFFLINE" in err


def test_a_preset_id_still_wins_over_the_same_name_in_the_cache(hub_cache, monkeypatch):
    # The Hub's old un-namespaced ids ("gpt2") name presets too: the preset answers, the cache is not read.
    add_to_cache(hub_cache, "gpt2", {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 64, "n_layer": 1,
                                     "n_head": 2, "n_positions": 1024})
    monkeypatch.setattr(hub, "load_hub_model", no_downloads)
    assert resolve_model("gpt2") is presets.models()["gpt2"]
    assert "gpt2" not in hub.cached_model_ids()


def test_a_path_shaped_like_an_id_is_still_a_path(hub_cache, tmp_path, monkeypatch):
    folder = tmp_path / "Qwen" / "Qwen2.5-0.5B"
    folder.mkdir(parents=True)
    shutil.copy(presets_dir() / "models" / "llama-3.2-1b.json", folder / "config.json")
    monkeypatch.chdir(tmp_path)
    assert resolve_model(HUB_ID).family == "llama"


@pytest.mark.parametrize(("raised", "expected"), [
    ("GatedRepoError", "is gated"),
    ("RepositoryNotFoundError", "no Hub repository"),
    ("LocalEntryNotFoundError", "could not reach the Hub"),
])
def test_online_refusals_are_one_line_naming_the_ways_out(hub_cache, monkeypatch, raised, expected):
    errors = pytest.importorskip("huggingface_hub.errors")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    response = SimpleNamespace(status_code=401 if raised != "GatedRepoError" else 403, headers={}, request=None)
    error_type = getattr(errors, raised)

    def refuse(repo_id, filename, **kwargs):
        assert filename == "config.json"  # never weights
        raise error_type("refused") if raised == "LocalEntryNotFoundError" else error_type("refused", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(InputError) as caught:
        resolve_model("meta-llama/Llama-3.1-8B")
    message = str(caught.value)
    assert caught.value.field == "model" and "\n" not in message and expected in message
    assert "--model PATH" in message and "HF_TOKEN" in message


def test_online_a_missing_config_is_downloaded_alone_into_the_cache(hub_cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    requested = []

    def download(repo_id, filename, *, cache_dir, **kwargs):
        requested.append((repo_id, filename))
        return str(add_to_cache(Path(cache_dir), repo_id, qwen_config(num_hidden_layers=4)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve_model("org/fresh").num_layers == 4
    assert resolve_model("org/fresh").num_layers == 4  # the second time from the cache
    assert requested == [("org/fresh", "config.json")]


def test_cached_model_ids_lists_model_repositories_with_a_config(hub_cache):
    add_to_cache(hub_cache, "org/zeta", qwen_config())
    (hub_cache / "models--org--weights-only" / "snapshots" / ("d" * 40)).mkdir(parents=True)
    (hub_cache / "datasets--org--data").mkdir()
    assert hub.cached_model_ids() == ["org/zeta", HUB_ID]  # by name, whatever the case


def test_start_up_and_presets_never_import_huggingface_hub():
    probe = ("import sys\nfrom memtui.tui.app import MemtuiApp\nimport memtui.engine.estimator\nMemtuiApp()\n"
             "from memtui.engine.model.presets import resolve_model\nresolve_model('gpt2')\n"
             "print('huggingface_hub' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


async def wait_for_model(pilot, model_id: str) -> None:
    for _ in range(300):
        if pilot.app.planner.options["model"] == model_id and not pilot.app.workers:
            break
        await pilot.pause(0.01)
    await settled(pilot)


@pytest.mark.anyio
async def test_typing_a_hub_id_into_the_model_field_shows_its_budget(hub_cache):
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        field = app.query_one("#opt-model_path", Input)
        field.focus()
        await pilot.press(*HUB_ID, "enter")
        await wait_for_model(pilot, HUB_ID)
        assert not row(app, "model_path").has_class("-invalid")
        assert app.query_one("#opt-model", Select).value == HUB_ID
        assert app.result.error is None and app.result.budget.model.id == HUB_ID
        assert app.result.budget.model.params == QWEN_PARAMS
        assert HUB_ID in app.sub_title


@pytest.mark.anyio
async def test_a_hub_id_not_in_the_cache_is_refused_beside_the_field(hub_cache):
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        before = app.result.budget
        app.query_one("#opt-model_path", Input).focus()
        await pilot.press(*"org/missing", "enter")
        for _ in range(300):
            if row(app, "model_path").has_class("-invalid"):
                break
            await pilot.pause(0.01)
        assert "HF_TOKEN" in note(app, "model_path") and "--model PATH" in note(app, "model_path")
        assert app.result.budget is before  # the last good budget stays on screen


@pytest.mark.anyio
async def test_the_palette_offers_models_from_the_hugging_face_cache(hub_cache):
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"Hugging Face cache")
        for _ in range(300):
            if app.screen.query("CommandList").first().option_count:
                break
            await pilot.pause(0.01)
        await pilot.press("enter")
        await wait_for_model(pilot, HUB_ID)
        assert app.result.budget.model.id == HUB_ID


@pytest.mark.anyio
async def test_a_download_runs_in_a_worker_not_on_the_ui_thread(hub_cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    threads = []

    def download(repo_id, filename, *, cache_dir, **kwargs):
        threads.append(threading.current_thread())
        return str(add_to_cache(Path(cache_dir), repo_id, qwen_config(num_hidden_layers=6)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        app.query_one("#opt-model_path", Input).focus()
        await pilot.press(*"org/fresh", "enter")
        await wait_for_model(pilot, "org/fresh")
        assert app.result.model.num_layers == 6 and app.result.budget.model.id == "org/fresh"
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


@pytest.mark.parametrize("name", ["org/name-", "org/-name", "org/na--me", "org/na..me", "org/name/extra"])
def test_a_name_the_hub_would_refuse_is_not_looked_up_there(hub_cache, monkeypatch, name):
    # huggingface_hub raises its own validation error for these; they are (missing) paths instead.
    monkeypatch.setattr(hub, "load_hub_model", no_downloads)
    assert not hub.is_hub_id(name)
    with pytest.raises(InputError, match="no such file"):
        resolve_model(name)
