"""--optimizer paged-adamw-8bit | paged-adamw: bitsandbytes' paged states in CUDA unified memory.

Not in the tensor peak (the caching allocator never sees them), in the device peak while resident, paged out to
the host when the step leaves no room; the estimate follows the trace tensor for tensor."""

from __future__ import annotations

import json

import pytest

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.estimator.optimizers import bnb_adam_state_bytes
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.framework_configs import read_framework_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.planning.fit import suggest
from tests.test_cli import run_cli

# `layers`: the preset cut to that many decoder layers (real widths, so the same tensors are paged or not). A paged
# optimizer's step is traced at every layer, 16 of Llama's and 24 of Qwen's took ~15 s and ~10 s; what is paged is
# decided tensor by tensor, the same in every layer.
CASES = [
    dict(model="gpt2", optimizer="paged-adamw-8bit", seq_len=256),  # full fine-tuning: wte and every matrix paged
    dict(model="gpt2", optimizer="paged-adamw", seq_len=256, precision="bf16-true"),  # fp32 states on bf16 weights
    dict(model="llama-3.2-1b", layers=4, optimizer="paged-adamw-8bit", seq_len=256, lora_rank=64,
         lora_targets="all-linear", quant="nf4", precision="bf16-true"),  # QLoRA: 64 x 2048 adapters (131,072 values) are paged, 64 x 512 not
    dict(model="qwen2.5-0.5b", layers=4, optimizer="paged-adamw", seq_len=512, lora_rank=16, checkpointing="full"),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_matches_trace(options):
    from memtui.engine.trace.generic import at_depth
    from memtui.engine.trace.runner import trace

    options = dict(options)
    layers = options.pop("layers", None)
    config = TrainingConfig(gpu="h100-80gb", **options)
    spec = at_depth(resolve_model(config.model), layers) if layers else None  # None: the preset itself
    traced = trace(config, model=spec)
    estimated = estimate(config, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated.tensor_peak_bytes - workspace - traced.traced_tensor_peak_bytes) \
        / traced.traced_tensor_peak_bytes < 0.002
    assert estimated.paged_bytes == traced.budget.paged_bytes
    assert estimated.model_states.optimizer_states == traced.budget.model_states.optimizer_states
    if options.get("lora_rank") == 16:
        assert estimated.paged_bytes == 0  # every adapter under 100,000 values: nothing is paged
    else:
        assert estimated.paged_bytes > 0


def test_paged_states_leave_the_tensor_peak_and_stay_in_the_device_peak():
    plain = estimate(TrainingConfig(model="llama-3.2-1b", optimizer="adamw-8bit"))
    paged = estimate(TrainingConfig(model="llama-3.2-1b", optimizer="paged-adamw-8bit"))
    # bitsandbytes: the moments of tensors of 100,000 values or more are paged; absmax and small tensors are not.
    assert paged.tensor_peak_bytes == plain.tensor_peak_bytes - paged.paged_bytes
    assert paged.per_gpu.optimizer_states == plain.per_gpu.optimizer_states  # all resident on an 80 GB card
    assert paged.paged_evicted_bytes == 0 and paged.per_gpu.total == paged.device_peak_bytes
    assert paged.model_states == plain.model_states


def test_bitsandbytes_rules_per_tensor():
    # 4095 values: fp32 moments in the allocator; 4096: uint8 + absmax; 100,000: uint8 moments paged.
    assert bnb_adam_state_bytes("paged-adamw-8bit", [4095]) == (2 * 16384, 0)
    assert bnb_adam_state_bytes("paged-adamw-8bit", [4096]) == (2 * 4096 + 2 * 512, 0)
    assert bnb_adam_state_bytes("paged-adamw-8bit", [100_000]) == (2 * 2048, 200_000)  # 391 absmax blocks: 1564 bytes, 2048 allocated
    assert bnb_adam_state_bytes("paged-adamw", [99_999]) == (2 * 400_384, 0)
    assert bnb_adam_state_bytes("paged-adamw", [100_000]) == (0, 800_000)
    assert bnb_adam_state_bytes("adamw-8bit", [100_000]) == (2 * 100_352 + 2 * 2048, 0)


def test_oversubscribed_card_pages_the_states_out_and_fits():
    over = TrainingConfig(model="llama-3.2-1b", gpu="t4", seq_len=512, checkpointing="full")
    assert not estimate(over).fits
    paged = estimate(over.model_copy(update={"optimizer": "paged-adamw"}))
    assert paged.fits and paged.paged_evicted_bytes > 0
    assert paged.device_peak_bytes == paged.gpu.memory_bytes  # the card is full, the rest on the host
    assert paged.device_required_bytes == paged.device_peak_bytes - (paged.paged_bytes - paged.paged_evicted_bytes)
    # fit proposes what fits resident, never states that migrate to the host every step
    plan = suggest(over).plan
    assert plan is not None and not plan.config.optimizer.startswith("paged")
    assert estimate(plan.config).paged_evicted_bytes == 0


@pytest.mark.parametrize(("options", "fields"), [
    (dict(gpus=2), "gpus"),
    (dict(precision="bf16-true", master_weights=True), "master_weights"),
    (dict(optimizer_in_backward=True), "optimizer_in_backward"),
    (dict(zero=2, offload="optimizer"), "offload"),
])
def test_refusals_name_the_fields(options, fields):
    with pytest.raises(InputError) as error:
        estimate(TrainingConfig(model="gpt2", seq_len=256, optimizer="paged-adamw-8bit", **options))
    assert error.value.field == "optimizer" and fields in error.value.fields


def test_cli(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "gpt2", "--optimizer", "paged-adamw-8bit", "--json")
    assert code == 0 and json.loads(out)["paged_bytes"] > 0
    code, out, err = run_cli(capsys, "estimate", "--model", "gpt2", "--optimizer", "paged-adamw", "--gpus", "2")
    assert code == 2 and err.count("\n") == 1 and "--optimizer" in err and "--gpus" in err
    code, _, err = run_cli(capsys, "estimate", "--optimizer", "paged-adamw-4bit")
    assert code == 2 and err.count("\n") == 1 and "paged-adamw-8bit" in err


@pytest.mark.parametrize(("text", "optimizer"), [
    ("optimizer:\n  _component_: bitsandbytes.optim.PagedAdamW8bit\nbatch_size: 1\n", "paged-adamw-8bit"),
    ("optimizer:\n  _component_: bitsandbytes.optim.PagedAdamW\nbatch_size: 1\n", "paged-adamw"),
])
def test_torchtune_paged_components(tmp_path, text, optimizer):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\n" + text)
    read = read_framework_config(path)
    assert read.options["optimizer"] == optimizer and not any("paged" in note for note in read.notes)


def test_hugging_face_paged_names(tmp_path):
    path = tmp_path / "args.yaml"
    for name, optimizer in (("paged_adamw_8bit", "paged-adamw-8bit"), ("paged_adamw_32bit", "paged-adamw")):
        path.write_text(f"per_device_train_batch_size: 1\noptim: {name}\n")
        assert read_framework_config(path).options["optimizer"] == optimizer



@pytest.mark.anyio
async def test_planner_picks_a_paged_optimizer_and_shows_the_paged_row():
    from memtui.tui.widgets.budget import ComponentTable
    from tests.test_tui_app import WIDE, make_app, ready, rendered, set_select

    app = make_app(options={"model": "llama-3.2-1b"})
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        assert "Paged (unified memory)" not in rendered(app.query_one(ComponentTable))
        await set_select(pilot, "optimizer", "paged-adamw-8bit")
        budget = app.result.budget
        assert budget == estimate(TrainingConfig(model="llama-3.2-1b", optimizer="paged-adamw-8bit"))
        assert "Paged (unified memory)" in rendered(app.query_one(ComponentTable))
        keys = [step.keys[0] for step in app.result.ladder.steps]
        assert "optimizer" in keys
