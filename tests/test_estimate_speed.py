"""estimate() stays fast by memoising pure work, not by a wall-clock limit a loaded CI machine would flake on:
a repeated estimate replays nothing and builds one pydantic model (the Budget, nested models included, in one
validation); a new batch size or sequence length at a known option set replays the step but not the layout and
model states. And the memos never change an answer."""

from __future__ import annotations

import pydantic
import pytest

import memtui.engine.estimator as estimator
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig

CONFIGS = [
    TrainingConfig(model="llama-3.1-8b", batch_size=2, seq_len=1024),
    TrainingConfig(model="qwen3-30b-a3b", gpus=8, zero=1, optimizer="adafactor", checkpointing="full"),
    TrainingConfig(model="gemma-3-4b", lora_rank=16, lora_targets="all-linear", quant="nf4",
                   optimizer="paged-adamw-8bit"),
    TrainingConfig(model="llama-3.2-1b", gpus=4, pp=2, batch_size=4, microbatches=4),
]


def _clear_memos() -> None:
    for cache in (estimator._STEPS, estimator._OPTION_SETS, estimator._LAYOUTS, estimator._BNB_STATES):
        cache.clear()


@pytest.fixture
def calls(monkeypatch):
    """Calls of the replay, the checks and the model-state arithmetic, and pydantic constructions."""
    counts: dict[str, int] = {}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return function(*args, **kwargs)
        return wrapper

    for name in ("check_config", "_step_moments", "_states_on_gpu", "activation_moments"):
        monkeypatch.setattr(estimator, name, counting(name, getattr(estimator, name)))
    monkeypatch.setattr(pydantic.BaseModel, "__init__", counting("model __init__", pydantic.BaseModel.__init__))
    validate = pydantic.BaseModel.model_validate.__func__
    monkeypatch.setattr(pydantic.BaseModel, "model_validate", classmethod(counting("model_validate", validate)))
    return counts


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda config: config.model)
def test_a_repeated_estimate_replays_nothing_and_builds_one_model(config, calls):
    first = estimate(config)
    calls.clear()
    again = estimate(config)
    assert calls == {"model_validate": 1}  # the Budget: no check, no replay, no per-model pydantic objects
    assert again.model_dump_json() == first.model_dump_json()


def test_a_new_batch_or_sequence_reuses_the_option_sets_model_states(calls):
    config = CONFIGS[1]
    estimate(config)
    calls.clear()
    estimate(config.model_copy(update={"batch_size": config.batch_size + 3, "seq_len": config.seq_len // 2}))
    assert calls.get("_states_on_gpu", 0) == 0  # the layout, the states and ZeRO-1's share scan: memoised
    assert calls["_step_moments"] == 1 and calls["check_config"] == 1


def test_memoised_answers_equal_fresh_ones_in_any_order():
    fresh = {}
    for config in CONFIGS:
        _clear_memos()
        fresh[config] = estimate(config).model_dump_json()
    _clear_memos()
    for config in [*CONFIGS, *reversed(CONFIGS), *CONFIGS]:
        assert estimate(config).model_dump_json() == fresh[config]


def test_changing_a_returned_budget_changes_no_later_answer():
    config = CONFIGS[2]
    budget = estimate(config)
    expected = budget.model_dump_json()
    budget.timeline[0].bytes += 1
    budget.config["batch_size"] = 99
    budget.notes.append("changed")
    budget.model_states.weights += 1
    budget.per_gpu.activations += 1
    assert estimate(config).model_dump_json() == expected


def test_a_callers_own_model_spec_is_not_taken_for_the_preset_of_the_same_id():
    config = CONFIGS[0]
    preset = resolve_model(config.model)
    shallower = preset.model_copy(update={"num_layers": preset.num_layers // 2})
    gpu = resolve_gpu(config.gpu)
    full = estimate(config, model=preset, gpu=gpu).tensor_peak_bytes
    half = estimate(config, model=shallower, gpu=gpu).tensor_peak_bytes
    assert half < full
    assert estimate(config, model=preset, gpu=gpu).tensor_peak_bytes == full
    bigger_gpu = gpu.model_copy(update={"memory_bytes": gpu.memory_bytes * 2})
    assert estimate(config, model=preset, gpu=bigger_gpu).headroom_bytes > estimate(config).headroom_bytes


def test_a_refusal_is_not_memoised():
    config = TrainingConfig(model="gpt2", seq_len=4096)
    for _ in range(2):
        with pytest.raises(InputError):
            estimate(config)
