"""What validation says of a layout memtui refuses (no stack runs it), for the tests of the traces' own refusals."""

from __future__ import annotations

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import check_config


def refusal(config: TrainingConfig, model: ModelSpec) -> str | None:
    """The one-line refusal `memtui estimate` and `memtui trace` give for this configuration, or None."""
    try:
        check_config(config, model, resolve_gpu(config.gpu))
    except InputError as error:
        return str(error)
    return None
