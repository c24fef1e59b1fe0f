"""Presets load, validate, and describe the real models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memtui.engine.model import presets
from memtui.engine.model.architectures import load_config_file
from memtui.engine.errors import InputError, PresetError

# Parameter counts of the released checkpoints (safetensors metadata / model cards).
REAL_PARAMS = {
    "gpt2": 124_439_808,
    "qwen2.5-0.5b": 494_032_768,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "phi-3-mini": 3_821_079_552,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "llama-3.1-8b": 8_030_261_248,
    "gemma-2-9b": 9_241_705_984,
    "mixtral-8x7b": 46_702_792_704,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-72b": 72_706_203_648,
    "llama-3.1-405b": 405_853_388_800,
}

REQUIRED_GPUS = (
    "gtx-1080-ti t4 rtx-3090 rtx-4090 rtx-5090 l4 a10 rtx-a6000 l40s v100-16gb v100-32gb "
    "a100-40gb a100-80gb h100-80gb h200-141gb b200-180gb"
).split()


def test_every_required_model_is_a_preset():
    assert set(REAL_PARAMS) <= set(presets.models())


@pytest.mark.parametrize("model_id", sorted(REAL_PARAMS))
def test_parameter_count_equals_released_checkpoint(model_id):
    assert presets.models()[model_id].params == REAL_PARAMS[model_id]


@pytest.mark.parametrize("model_id", sorted(REAL_PARAMS))
def test_parameter_count_equals_transformers_build(model_id):
    """The architecture facts agree with what transformers builds from the same config.json."""
    torch = pytest.importorskip("torch")
    from memtui.engine.torchside.build import hf_model_on_meta

    spec = presets.models()[model_id]
    model = hf_model_on_meta(spec)
    # named_parameters() deduplicates tied weights, like the released counts do.
    counted = sum(p.numel() for _, p in model.named_parameters())
    assert counted == spec.params
    assert isinstance(next(model.parameters()), torch.nn.Parameter)


def test_every_required_gpu_is_a_preset():
    gpus = presets.gpus()
    assert set(REQUIRED_GPUS) <= set(gpus)
    assert gpus["h100-80gb"].memory_bytes == 81559 * 2**20
    assert gpus["h100-80gb"].bf16 and gpus["h100-80gb"].fp8
    assert not gpus["v100-16gb"].bf16


def test_recipes_validate_and_name_known_presets():
    presets.validate_all()
    recipes = presets.recipes()
    assert {"qlora-24gb", "zero3-8xh100", "full-ft-bf16-ckpt"} <= set(recipes)
    assert recipes["zero3-8xh100"].options["zero"] == 3


def _copy_presets(tmp_path: Path) -> Path:
    root = tmp_path / "presets"
    shutil.copytree(presets.presets_dir(), root)
    return root


def test_broken_model_file_names_the_file_and_field(tmp_path, monkeypatch):
    root = _copy_presets(tmp_path)
    path = root / "models" / "gpt2.json"
    config = json.loads(path.read_text())
    config["n_layer"] = -3
    path.write_text(json.dumps(config))
    monkeypatch.setenv("MEMTUI_PRESETS", str(root))
    with pytest.raises(PresetError) as error:
        presets.models()
    assert "gpt2.json" in str(error.value) and "n_layer" in str(error.value)


def test_malformed_json_names_line(tmp_path, monkeypatch):
    root = _copy_presets(tmp_path)
    (root / "gpus.json").write_text('{"gpus": [\n  {"id": "x",,}\n]}')
    monkeypatch.setenv("MEMTUI_PRESETS", str(root))
    with pytest.raises(PresetError) as error:
        presets.gpus()
    assert "gpus.json" in str(error.value) and "line 2" in str(error.value)


def test_invalid_gpu_field_is_named(tmp_path, monkeypatch):
    root = _copy_presets(tmp_path)
    data = json.loads((root / "gpus.json").read_text())
    data["gpus"][0]["memory_bytes"] = 0
    (root / "gpus.json").write_text(json.dumps(data))
    monkeypatch.setenv("MEMTUI_PRESETS", str(root))
    with pytest.raises(PresetError, match=r"gpus\[0\]\.memory_bytes"):
        presets.gpus()


def test_recipe_with_bad_option_value_is_named(tmp_path, monkeypatch):
    root = _copy_presets(tmp_path)
    data = json.loads((root / "recipes.json").read_text())
    data["recipes"][0]["options"]["precision"] = "fp8"
    (root / "recipes.json").write_text(json.dumps(data))
    monkeypatch.setenv("MEMTUI_PRESETS", str(root))
    with pytest.raises(PresetError, match=r"recipes\[0\]\.options\.precision"):
        presets.recipes()


def test_config_path_is_accepted(tmp_path):
    source = presets.presets_dir() / "models" / "llama-3.2-1b.json"
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(source.read_text())
    spec = presets.resolve_model(str(folder))
    assert spec.id == "my-model" and spec.params == REAL_PARAMS["llama-3.2-1b"]


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5", "vocab_size": 10}))
    with pytest.raises(InputError, match="unsupported architecture 't5'"):
        load_config_file(path)


def test_unknown_model_suggests_a_close_preset():
    with pytest.raises(InputError, match="did you mean 'llama-3.1-8b'"):
        presets.resolve_model("llama-3.1-8")
