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
from memtui.engine.model import validation
from memtui.engine.model.specs import TrainingConfig

CONFIGS = [
    TrainingConfig(model="llama-3.1-8b", batch_size=2, seq_len=1024),
    TrainingConfig(model="qwen3-30b-a3b", gpus=8, zero=1, optimizer="adafactor", checkpointing="full"),
    TrainingConfig(model="gemma-3-4b", lora_rank=16, lora_targets="all-linear", quant="nf4",
                   optimizer="paged-adamw-8bit"),
    TrainingConfig(model="llama-3.2-1b", gpus=4, pp=2, batch_size=4, microbatches=4),
]


def _clear_memos() -> None:
    for cache in (estimator._STEPS, estimator._OPTION_SETS, estimator._PROGRAMS_SEEN, estimator._PLANS, estimator._CHECKS,
                  estimator._LAYOUTS, estimator._BNB_STATES):
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

    for name in ("check_config", "_step_moments", "_states_on_gpu", "step_forms", "symbolic_step_forms"):
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


def test_a_new_batch_or_sequence_reuses_the_option_sets_model_states_and_step_plan(calls):
    config = CONFIGS[1]
    estimate(config)
    estimate(config.model_copy(update={"batch_size": config.batch_size + 1}))  # a second shape: the plan is made
    calls.clear()
    estimate(config.model_copy(update={"batch_size": config.batch_size + 3, "seq_len": config.seq_len // 2}))
    assert calls.get("_states_on_gpu", 0) == 0  # the layout, the states and ZeRO-1's share scan: memoised
    # the program's plan: its forms evaluated at the new shape, no moments built
    assert calls.get("_step_moments", 0) == calls.get("step_forms", 0) == calls.get("symbolic_step_forms", 0) == 0
    assert calls["check_config"] == 1


# One option set per way the step's moments are built: FSDP2's root group and ZeRO-3's gathers, gradient
# accumulation, optimizer in backward, tensor parallelism's embedding gradient, LoRA/QLoRA, activation offload,
# Liger's fused head (its chunk rows change the program with the shape), Phi-3's batched layout.
PLANNED = [
    TrainingConfig(model="llama-3.2-1b", gpus=8, zero=3, checkpointing="full"),
    TrainingConfig(model="qwen2.5-0.5b", gpus=4, zero=2, grad_accum=3),
    TrainingConfig(model="gemma-3-1b", optimizer_in_backward=True, precision="bf16-true"),
    TrainingConfig(model="llama-3.2-1b", gpus=8, tp=4, zero=3),
    TrainingConfig(model="llama-3.2-1b", lora_rank=16, lora_targets="all-linear", quant="nf4", grad_accum=2),
    TrainingConfig(model="llama-3.2-1b", activation_offload=True, checkpointing="full"),
    TrainingConfig(model="qwen2.5-0.5b", loss="fused-linear"),
    TrainingConfig(model="phi-3-mini", attention="flash"),
]
SHAPES = [(1, 1), (2, 3), (1, 1000), (3, 2048), (8, 4099), (1, 131072)]


@pytest.mark.parametrize("config", PLANNED, ids=lambda config: config.model)
def test_a_step_plan_gives_what_the_moments_built_at_each_shape_give(config, monkeypatch):
    """The plan (the moments as forms, evaluated at a shape, those always matched dropped), made at the config's
    shape, against the moments built at each shape: the same Budget, byte for byte."""
    model, gpu = resolve_model(config.model), resolve_gpu(config.gpu)
    _clear_memos()
    estimate(config, model=model, gpu=gpu)
    shapes = [config.model_copy(update={"batch_size": batch, "seq_len": seq}) for batch, seq in SHAPES]
    planned = []
    for at in shapes:
        estimate(at, model=model, gpu=gpu)  # a program's first shape is evaluated at it; a second is planned
        estimator._STEPS.clear()
        planned.append(estimate(at, model=model, gpu=gpu).model_dump_json())
    assert estimator._PLANS and all(plan is not None for _model, _gpu, plan in estimator._PLANS.values())
    _clear_memos()
    monkeypatch.setattr(estimator, "_step_plan", lambda *args: None)  # each shape's moments, built at it
    assert [estimate(at, model=model, gpu=gpu).model_dump_json() for at in shapes] == planned


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


class _ShapeAsked(Exception):
    pass


class _Unasked:
    """A batch size or sequence length that no operation may touch."""

    def _asked(self, *_args):
        raise _ShapeAsked

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __bool__ = __int__ = __index__ = _asked
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __floordiv__ = __rfloordiv__ = _asked
    __truediv__ = __rtruediv__ = __mod__ = __rmod__ = __format__ = __str__ = __float__ = _asked


# Options that break, or come near breaking, the rules: each rule's condition read as far as it goes.
RULE_OPTIONS = [
    {}, {"gpus": 8, "tp": 2}, {"gpus": 8, "tp": 3}, {"gpus": 4, "tp": 8}, {"gpus": 6, "pp": 4}, {"pp": 200, "gpus": 200},
    {"lora_rank": 16, "lora_targets": "all-linear"}, {"lora_rank": 100000}, {"lora_rank": 8, "lora_targets": "nothing"},
    {"lora_rank": 8, "optimizer": "galore-adamw"}, {"optimizer": "galore-adamw", "galore_rank": 100000},
    {"quant": "nf4"}, {"quant": "nf4", "lora_rank": 8, "precision": "32-true"}, {"master_weights": True},
    {"offload": "optimizer+params", "zero": 2, "gpus": 2}, {"offload": "optimizer"},
    {"optimizer_in_backward": True, "grad_accum": 2}, {"optimizer_in_backward": True, "zero": 1, "gpus": 2},
    {"optimizer_in_backward": True, "precision": "16-mixed"}, {"zero": 3}, {"optimizer_impl": "fused", "optimizer": "lion"},
    {"precision": "bf16-true", "gpu": "t4"}, {"gpus": 2, "tp": 2, "attention": "eager"},
    {"checkpointing": "selective"}, {"checkpointing": "selective-op", "gpus": 2, "tp": 2}, {"loss": "chunked", "gpus": 2},
    {"loss_dtype": "compute"}, {"loss": "fused-linear"}, {"lora_rank": 8, "quant": "nf4", "precision": "16-mixed",
                                                         "lora_dtype": "compute"},
    {"kbit_prep": True}, {"quant": "nf4", "lora_rank": 8, "precision": "bf16-mixed"},
    {"optimizer": "paged-adamw-8bit", "gpus": 2}, {"optimizer": "paged-adamw", "master_weights": True},
    {"activation_offload": True, "gpus": 2}, {"lora_rank": 8, "lora_targets": "all-linear,lm_head", "loss": "fused-linear"},
    {"lora_rank": 8, "lora_targets": "all-linear,lm_head", "gpus": 2},
    {"lora_rank": 8, "lora_targets": "lm_head", "kbit_prep": True, "lora_dtype": "compute", "quant": "nf4"},
    {"bnb_version": "legacy", "quant": "int8", "lora_rank": 8}, {"bnb_version": "legacy", "quant": "nf4", "lora_rank": 8,
                                                                 "gpus": 2},
    {"bnb_version": "legacy"}, {"compile": True}, {"compile": True, "quant": "nf4", "lora_rank": 8},
    {"fsdp_param_dtype": "compute"}, {"fsdp_param_dtype": "compute", "gpus": 4, "zero": 3},
    {"shard_group": 2, "zero": 1, "gpus": 4}, {"shard_group": 3, "zero": 3, "gpus": 8},
    {"pp": 2, "gpus": 2, "microbatches": 3}, {"pp": 4, "gpus": 4, "pp_schedule": "1f1b", "microbatches": 2},
    {"pp": 2, "gpus": 2, "pp_schedule": "interleaved-1f1b", "microbatches": 3}, {"microbatches": 2},
    {"pp": 2, "gpus": 4, "zero": 3, "tp": 2, "microbatches": 2},
]
RULE_MODELS = ["llama-3.2-1b", "gpt2", "qwen3-30b-a3b", "gemma-3-1b", "phi-3-mini", "gpt-oss-20b", "gemma-2-9b"]


def _configs_for_rules():
    for model_id in RULE_MODELS:
        for options in RULE_OPTIONS:
            try:
                yield TrainingConfig(**{"model": model_id, **options})
            except (ValueError, InputError):
                continue


def test_a_rule_that_names_no_shape_field_never_reads_the_batch_size_or_sequence_length():
    """checks_at_a_shape judges such a rule once per option set: it must not read the shape, properties included."""
    shape_free = [rule for rule in validation.RULES if not validation.SHAPE_FIELDS.intersection(rule.fields)]
    judged = 0
    for config in _configs_for_rules():
        model, gpu = resolve_model(config.model), resolve_gpu(config.gpu)
        facts = validation.Facts(config.model_copy(update={"batch_size": _Unasked(), "seq_len": _Unasked()}), model, gpu)
        for rule in shape_free:
            try:
                rule.broken(facts)
            except InputError:
                pass
            judged += 1
    assert judged > 1000


@pytest.mark.parametrize("shape", [(1, 1), (3, 1024), (4, 5000), (16, 131072)])
def test_the_checks_kept_for_an_option_set_say_what_every_rule_says(shape):
    """check_config with checks_at_a_shape (made at another shape) against every rule asked: the same notes, or the
    same refusal."""
    def outcome(config, model, gpu, checks=None):
        try:
            return validation.check_config(config, model, gpu, checks)
        except InputError as error:
            return str(error)

    for config in _configs_for_rules():
        model, gpu = resolve_model(config.model), resolve_gpu(config.gpu)
        checks = validation.checks_at_a_shape(config, model, gpu)
        at = config.model_copy(update={"batch_size": shape[0], "seq_len": shape[1]})
        assert outcome(at, model, gpu, checks) == outcome(at, model, gpu)


@pytest.mark.parametrize("base", [
    # LitGPT's modelled setup (its Phi-3 adapters take their own shapes), and a multi-GPU one
    TrainingConfig(model="phi-3-mini", precision="bf16-true", batch_size=2, seq_len=512, lora_rank=8,
                   lora_targets="all-linear", lora_dtype="compute", loss="chunked", loss_chunks=4,
                   loss_dtype="compute"),
    TrainingConfig(model="llama-3.2-1b", gpus=8, zero=3, batch_size=2, seq_len=512),
])
def test_a_memo_never_answers_for_a_config_differing_in_one_option(base):
    """Every picker value of every option, estimated right after `base` (whose memos are then warm) and fresh: a
    memo keyed on fewer fields than its answer reads would give the first config's layout to the second (the
    layout's key once lacked --modeling: LitGPT's Phi-3 then got peft's adapters after peft's row)."""
    from memtui.engine.model.options import OPTIONS

    tried = 0
    for option in OPTIONS.values():
        for text in option.choices:
            try:
                other = base.model_copy(update={option.field: option.from_text(text)})
                _clear_memos()
                fresh = estimate(other).model_dump_json()
            except (InputError, pydantic.ValidationError):
                continue
            _clear_memos()
            estimate(base)
            assert estimate(other).model_dump_json() == fresh, (option.field, text)
            tried += 1
    assert tried > 20
