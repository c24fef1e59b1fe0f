"""Generic decoders: the derived step program, its cache on disk, and what the generic path supports.

A config.json whose model_type memtui does not replay by hand is built by transformers
(AutoModelForCausalLM) and traced at a few depths and (batch, sequence) points
(memtui.engine.trace.generic). What comes out is a *program*: every candidate peak of
the step as exact forms in batch b, sequence s and depth L,

    bytes = sum over basis terms (1, b, s, b*s, s^2, b*s^2) of (c0 + c1 * L) * term,

per component (weights, gradients, optimizer states, activations, temporaries). It is
stored as JSON per (config, option set), so that later estimates read it in microseconds
without importing torch. The layer's linear layers and the parameter count per depth are
stored per config (the *structure*), so LoRA targets can be checked before any trace.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import LinearLayer, ModelSpec
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import adapts_head

CACHE_DIR_ENV = "MEMTUI_CACHE_DIR"
PROGRAM_VERSION = 2  # bump when the program's meaning changes: old cache files are then ignored
METHOD = "generic (traced layers)"

# The options the traced program depends on (besides batch and sequence, which it is a function of).
PROGRAM_OPTIONS = ("precision", "master_weights", "optimizer", "optimizer_impl", "checkpointing", "attention",
                   "lora_rank", "lora_targets")
SUPPORTED_OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "lion", "adafactor")
# Options a generic model is refused with unless they keep these values: (field, required value, what it is).
_SINGLE_GPU_DEFAULTS = (
    ("gpus", 1, "one GPU"), ("zero", 0, "ZeRO 0"), ("tp", 1, "no tensor parallelism"),
    ("pp", 1, "no pipeline parallelism"), ("offload", "none", "no offload"), ("quant", "none", "no quantization"),
    ("loss", "standard", "the standard loss"), ("grad_accum", 1, "no gradient accumulation"),
    ("optimizer_in_backward", False, "no optimizer in backward"),
)


def cache_dir() -> Path:
    """$MEMTUI_CACHE_DIR, else the user cache folder (platformdirs), else ~/.cache/memtui."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override)
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # platformdirs comes with the dependencies, but is not one of memtui's own
        return Path.home() / ".cache" / "memtui"
    return Path(user_cache_dir("memtui"))


def check_generic_options(config: TrainingConfig, model: ModelSpec) -> None:
    """One-line refusal naming the first option the generic path does not model."""
    for field, value, meaning in _SINGLE_GPU_DEFAULTS:
        if getattr(config, field) != value:
            raise InputError(field, f"{model.id} is a generic model (traced layers), modelled with {meaning}",
                             str(value).lower() if isinstance(value, bool) else str(value))
    if adapts_head(config):
        raise InputError("lora_targets", f"LoRA on lm_head is not modelled for generic model {model.id}",
                         "the decoder's linear layers")
    if config.checkpointing in ("selective", "selective-op"):
        raise InputError("checkpointing", f"{config.checkpointing} is not modelled for generic model {model.id}",
                         "none, full")
    if config.optimizer not in SUPPORTED_OPTIMIZERS:
        raise InputError("optimizer", f"{config.optimizer} is not modelled for generic model {model.id}",
                         ", ".join(SUPPORTED_OPTIMIZERS))


def _versions() -> str:
    """The libraries the program was traced with: a new transformers may build a different module."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "peft"):
        try:
            found.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}=none")
    return ",".join(found)


@lru_cache(maxsize=1)
def _cached_versions() -> str:
    return _versions()


def config_digest(model: ModelSpec) -> str:
    """The hash of the architecture: the config.json without memtui's metadata and the layer count (the
    program is a function of depth), and the library versions."""
    config = {key: value for key, value in model.hf_config().items()
              if key not in ("num_hidden_layers", "n_layer", "num_layers", "_name_or_path")}
    text = json.dumps({"config": config, "versions": _cached_versions(), "v": PROGRAM_VERSION}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def options_digest(config: TrainingConfig) -> str:
    text = json.dumps({name: getattr(config, name) for name in PROGRAM_OPTIONS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def structure_path(model: ModelSpec) -> Path:
    return cache_dir() / "generic" / f"{config_digest(model)}.structure.json"


def program_path(model: ModelSpec, config: TrainingConfig) -> Path:
    return cache_dir() / "generic" / f"{config_digest(model)}.{options_digest(config)}.program.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (another process may read the cache meanwhile); an unusable folder names the variable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(data))
        partial.replace(path)
    except OSError as error:
        raise InputError(CACHE_DIR_ENV, f"cannot write the generic model cache {str(path.parent)!r}: "
                         f"{error.strerror or error}") from None


_LOADED: dict[Path, tuple[float, dict[str, Any]]] = {}


def _read(path: Path) -> dict[str, Any] | None:
    """The cached JSON, memoised per file and modification time; None when absent or unreadable."""
    try:
        stamp = path.stat().st_mtime
    except OSError:
        return None
    hit = _LOADED.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != PROGRAM_VERSION:
        return None
    _LOADED[path] = (stamp, data)
    return data


_PATHS: dict[tuple, tuple[ModelSpec, Path, Path]] = {}


def _paths(model: ModelSpec, config: TrainingConfig) -> tuple[Path, Path]:
    """(structure, program) paths, memoised per model object and option set: hashing a config costs more
    than evaluating its program."""
    key = (id(model), os.environ.get(CACHE_DIR_ENV), *(getattr(config, name) for name in PROGRAM_OPTIONS))
    hit = _PATHS.get(key)
    if hit is None or hit[0] is not model:
        if len(_PATHS) > 256:
            _PATHS.clear()
        hit = (model, structure_path(model), program_path(model, config))
        _PATHS[key] = hit  # holding the model keeps its id from being reused
    return hit[1], hit[2]


def load_structure(model: ModelSpec) -> dict[str, Any] | None:
    return _read(structure_path(model))


def load_program(model: ModelSpec, config: TrainingConfig) -> dict[str, Any] | None:
    return _read(_paths(model, config)[1])


def needs_derivation(model: ModelSpec, config: TrainingConfig) -> bool:
    """Whether an estimate of this generic model and option set must trace first (torch: seconds)."""
    if model.family != "generic":
        return False
    check_generic_options(config, model)
    structure, program = _paths(model, config)
    return _read(structure) is None or _read(program) is None


_DEFAULT_OPTIONS = TrainingConfig()
_STRUCTURED: dict[int, tuple[ModelSpec, dict[str, Any], ModelSpec]] = {}


def with_structure(model: ModelSpec) -> ModelSpec:
    """The generic spec with its layer's linear layers, as the built module has them (for LoRA targets)."""
    structure = _read(_paths(model, _DEFAULT_OPTIONS)[0])
    if structure is None or model.linears:
        return model
    hit = _STRUCTURED.get(id(model))
    if hit is not None and hit[0] is model and hit[1] is structure:
        return hit[2]
    linears = tuple(LinearLayer(**linear) for linear in structure["linears"])
    meta = {**model.config.get("_memtui", {}), "params": per_depth(structure["params"], model.num_layers)}
    structured = model.model_copy(update={"linears": linears, "architecture": structure["architecture"],
                                          "config": {**model.config, "_memtui": meta}})
    if len(_STRUCTURED) > 64:
        _STRUCTURED.clear()
    _STRUCTURED[id(model)] = (model, structure, structured)
    return structured


def per_depth(pair: list[float], layers: int) -> int:
    """A quantity c0 + c1 * L of the program at depth L."""
    return int(round(pair[0] + pair[1] * layers))
