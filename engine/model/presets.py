"""Load and validate the preset data: models (config.json), GPUs and recipes.

Presets are data, not code. A broken file raises PresetError naming the file
and the field; nothing is loaded half-way.
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from memtui.engine.model import hub
from memtui.engine.model.architectures import ModelSpec, load_config_file, read_json_file
from memtui.engine.errors import InputError, PresetError
from memtui.engine.model.specs import GpuSpec, Recipe, TrainingConfig


def presets_dir() -> Path:
    """The presets folder: MEMTUI_PRESETS, the source tree's presets/, or the wheel's copy."""
    return _presets_dir(os.environ.get("MEMTUI_PRESETS") or "")


@lru_cache(maxsize=8)
def _presets_dir(override: str) -> Path:
    # Cached: every estimate resolves its presets, and the file system checks cost more than the estimate.
    if override:
        return Path(override)
    # A wheel holds memtui/presets beside memtui/engine; the source tree, presets/ beside engine/.
    # Not resolve()d: in the source tree memtui/engine is a link, and both places work through it.
    package = Path(__file__).parents[2]
    installed = package / "presets"
    return installed if installed.is_dir() else package.parent / "presets"


def _first_error(error: ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(root)"
    return field, first["msg"]


def _read_json(path: Path) -> Any:
    try:
        return read_json_file(path)
    except InputError as error:
        raise PresetError(error.field, error.message, error.allowed) from None


@lru_cache(maxsize=4)
def _load_models(root: Path) -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for path in sorted((root / "models").glob("*.json")):
        try:
            spec = load_config_file(path)
        except InputError as error:
            raise PresetError(error.field, error.message, error.allowed) from None
        models[spec.id] = spec
    if not models:
        raise PresetError(str(root / "models"), "no model presets found")
    return models


_Entry = TypeVar("_Entry", GpuSpec, Recipe)


def _load_entries(path: Path, key: str, model: type[_Entry]) -> dict[str, tuple[int, _Entry]]:
    """`{key: [...]}` in a presets file, each entry validated as `model`, by id (with its index, for errors)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise PresetError(f"{path}: {key}", f"must be a list of {model.__name__} objects")
    entries: dict[str, tuple[int, _Entry]] = {}
    for index, entry in enumerate(data[key]):
        try:
            validated = model.model_validate(entry)
        except ValidationError as error:
            field, message = _first_error(error)
            raise PresetError(f"{path}: {key}[{index}].{field}", message) from None
        if validated.id in entries:
            raise PresetError(f"{path}: {key}[{index}].id", f"duplicate id {validated.id!r}")
        entries[validated.id] = (index, validated)
    return entries


@lru_cache(maxsize=4)
def _load_gpus(root: Path) -> dict[str, GpuSpec]:
    return {gpu_id: gpu for gpu_id, (_, gpu) in _load_entries(root / "gpus.json", "gpus", GpuSpec).items()}


@lru_cache(maxsize=4)
def _load_recipes(root: Path) -> dict[str, Recipe]:
    path = root / "recipes.json"
    known_options = set(TrainingConfig.model_fields)
    recipes: dict[str, Recipe] = {}
    for recipe_id, (index, recipe) in _load_entries(path, "recipes", Recipe).items():
        unknown = set(recipe.options) - known_options
        if unknown:
            raise PresetError(
                f"{path}: recipes[{index}].options.{sorted(unknown)[0]}",
                "unknown option",
                ", ".join(sorted(known_options)),
            )
        try:
            TrainingConfig.model_validate(recipe.options)
        except ValidationError as error:
            field, message = _first_error(error)
            raise PresetError(f"{path}: recipes[{index}].options.{field}", message) from None
        recipes[recipe_id] = recipe
    return recipes


def models() -> dict[str, ModelSpec]:
    return _load_models(presets_dir())


def gpus() -> dict[str, GpuSpec]:
    return _load_gpus(presets_dir())


def recipes() -> dict[str, Recipe]:
    return _load_recipes(presets_dir())


def validate_all() -> None:
    """Load every preset; raises PresetError on the first broken one."""
    models()
    gpu_ids = gpus()
    model_ids = models()
    for recipe in recipes().values():
        if "gpu" in recipe.options and recipe.options["gpu"] not in gpu_ids:
            raise PresetError(f"recipes.json: {recipe.id}.options.gpu", f"unknown GPU {recipe.options['gpu']!r}")
        if "model" in recipe.options and recipe.options["model"] not in model_ids:
            raise PresetError(f"recipes.json: {recipe.id}.options.model", f"unknown model {recipe.options['model']!r}")


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_path(name: str) -> Path | None:
    """The config.json a --model value names, or None when it looks like no path at all."""
    try:
        path = Path(name).expanduser()
        looks_like_path = os.sep in name or name.endswith(".json") or path.exists()
        if not looks_like_path:
            return None
        if path.is_dir():
            path = path / "config.json"
        exists = path.exists()
    except RuntimeError as error:  # ~nosuchuser: no home directory to expand
        raise InputError("model", f"cannot expand {name!r}: {error}") from None
    except (OSError, ValueError) as error:  # a name too long, a NUL byte
        raise InputError("model", f"not a usable path: {getattr(error, 'strerror', None) or error}") from None
    if not exists:
        raise InputError("model", f"no such file {str(path)!r}")
    return path


def resolve_model(name: str) -> ModelSpec:
    """A preset id, a path to a config.json (or a folder holding one), or a Hugging Face Hub id (`org/name`)."""
    presets = models()
    if name in presets:
        return presets[name]
    if hub.names_hub_repo(name, presets):
        return hub.load_hub_model(name)
    path = _model_path(name)
    if path is not None:
        return load_config_file(path)
    raise InputError(
        "model",
        f"unknown model {name!r}{_suggest(name, list(presets))}",
        ", ".join(presets) + ", a path to a config.json, or a Hub id (org/name)",
    )


def resolve_gpu(name: str) -> GpuSpec:
    presets = gpus()
    if name in presets:
        return presets[name]
    raise InputError("gpu", f"unknown GPU {name!r}{_suggest(name, list(presets))}", ", ".join(presets))


def resolve_recipe(name: str) -> Recipe:
    presets = recipes()
    if name in presets:
        return presets[name]
    raise InputError("recipe", f"unknown recipe {name!r}{_suggest(name, list(presets))}", ", ".join(presets))
