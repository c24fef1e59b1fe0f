"""--activation-offload: torchtune's OffloadActivations (single stream) in the trace, the estimate and the planner.

What stays on the GPU is decided the way torchtune's pack hook decides it: Parameters saved as themselves,
tensors under 1024 bytes, and what the head and the loss save; everything else the decoder saves goes to pinned
host memory, reported apart, and comes back for the node of backward that needs it."""

from __future__ import annotations

import json

import pytest

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.framework_configs import read_framework_config
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from tests.test_cli import run_cli

CASES = [
    dict(model="llama-3.2-1b", seq_len=512, batch_size=2, lora_rank=16, precision="bf16-true"),
    dict(model="llama-3.2-1b", seq_len=512, batch_size=2, lora_rank=16, precision="bf16-true", checkpointing="full"),
    dict(model="qwen2.5-0.5b", seq_len=256, checkpointing="selective"),  # full fine-tuning under autocast
    dict(model="llama-3.2-1b", seq_len=256, lora_rank=16, quant="nf4", precision="bf16-true", checkpointing="full"),
    dict(model="gpt2", seq_len=256, lora_rank=8, lora_targets="c_attn", precision="bf16-true"),  # Conv1D weights stay
    dict(model="llama-3.2-1b", seq_len=4, lora_rank=8, precision="bf16-true"),  # per-token tensors under 1024 bytes
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_matches_trace(options):
    from memtui.engine.trace.runner import trace

    config = TrainingConfig(gpu="h100-80gb", activation_offload=True, **options)
    traced = trace(config)
    estimated = estimate(config)
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated.tensor_peak_bytes - workspace - traced.traced_tensor_peak_bytes) \
        / traced.traced_tensor_peak_bytes < 0.002
    host_traced = traced.budget.offloaded_activation_bytes
    assert host_traced > 0
    assert abs(estimated.offloaded_activation_bytes - host_traced) / host_traced < 0.002


def test_offloading_saves_device_memory_and_reports_host_memory():
    base = dict(model="llama-3.1-8b", seq_len=8192, lora_rank=16, precision="bf16-true")
    plain = estimate(TrainingConfig(**base))
    offloaded = estimate(TrainingConfig(activation_offload=True, **base))
    assert plain.offloaded_activation_bytes == 0
    assert offloaded.tensor_peak_bytes < plain.tensor_peak_bytes * 0.7
    # What left the GPU is (about) what the host holds: every layer's saved tensors, the weights' copies too.
    assert offloaded.offloaded_activation_bytes > plain.per_gpu.activations * 0.8
    # With full checkpointing only each layer's input goes: (b, s, h) in bf16 for each of the 32 layers, plus what
    # the final norm, outside the checkpoints, saves (its fp32 upcast and the normalized bf16 hidden state: 3 more).
    checkpointed = estimate(TrainingConfig(activation_offload=True, checkpointing="full", **base))
    layer_input = 8192 * 4096 * 2
    assert 35 * layer_input <= checkpointed.offloaded_activation_bytes <= 36 * layer_input + 65536
    assert checkpointed.tensor_peak_bytes < estimate(TrainingConfig(checkpointing="full", **base)).tensor_peak_bytes


def test_fake_trace_hooks_run_on_real_tensors_too():
    """The same hooks on a real CPU run give the same log as the fake trace."""
    from memtui.engine.trace.analysis import summarize
    from memtui.engine.trace.fake_step import run_fake_steps
    from tests.test_trace import tiny_llama

    spec = tiny_llama()
    config = TrainingConfig(model="llama-3.2-1b", precision="32-true", seq_len=64, activation_offload=True,
                            checkpointing="full")
    fake, _ = run_fake_steps(spec, config)
    real, _ = run_fake_steps(spec, config, fake=False)
    assert summarize(fake).peak_bytes == summarize(real).peak_bytes
    assert fake.host_peak_bytes == real.host_peak_bytes > 0


def test_refusal_and_cli(capsys):
    with pytest.raises(InputError) as error:
        estimate(TrainingConfig(model="gpt2", seq_len=256, activation_offload=True, gpus=2))
    assert error.value.field == "activation_offload" and "gpus" in error.value.fields
    code, _, err = run_cli(capsys, "estimate", "--model", "gpt2", "--activation-offload", "--gpus", "2")
    assert code == 2 and err.count("\n") == 1 and "--activation-offload" in err
    code, out, _ = run_cli(capsys, "estimate", "--model", "gpt2", "--seq-len", "256", "--activation-offload", "--json")
    assert code == 0 and json.loads(out)["offloaded_activation_bytes"] > 0


def test_from_file_torchtune_and_axolotl(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\nbatch_size: 1\n"
                    "enable_activation_checkpointing: true\nenable_activation_offloading: true\n")
    read = read_framework_config(path)
    assert read.options["activation_offload"] is True and read.options["checkpointing"] == "full"
    assert not any("offload" in note for note in read.notes)
    path = tmp_path / "axolotl.yaml"
    path.write_text("base_model: meta-llama/Llama-3.2-1B\nmicro_batch_size: 1\ngradient_checkpointing: true\n"
                    "activation_offloading: true\n")
    assert read_framework_config(path).options["activation_offload"] is True


def test_fit_suggests_offloading_where_it_makes_the_run_fit():
    from memtui.engine.planning.fit import suggest

    config = TrainingConfig(model="llama-3.2-1b", gpu="rtx-4090", lora_rank=16, precision="bf16-true",
                            seq_len=16384, batch_size=8, checkpointing="full", loss="fused-linear")
    assert not estimate(config).fits
    plan = suggest(config).plan
    assert plan is not None and plan.config.activation_offload and not plan.changes_training


@pytest.mark.anyio
async def test_planner_switch_explains_and_shows_the_host_row():
    from textual.widgets import Checkbox

    from memtui.tui.widgets.budget import ComponentTable
    from tests.test_tui_app import WIDE, make_app, ready, rendered, settled

    app = make_app(options={"model": "llama-3.2-1b", "checkpointing": "full"})
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        assert "Offloaded to CPU" not in rendered(app.query_one(ComponentTable))
        switch = app.query_one("#opt-activation_offload", Checkbox)
        assert switch.value is False
        switch.focus()  # scrolled into view: the inputs do not all fit on the screen
        await pilot.press("space")
        await settled(pilot)
        assert switch.value is True
        assert app.result.budget == estimate(TrainingConfig(model="llama-3.2-1b", checkpointing="full",
                                                            activation_offload=True))
        assert "Offloaded to CPU (pinned)" in rendered(app.query_one(ComponentTable))
        assert "activation_offload" in [step.keys[0] for step in app.result.ladder.steps]
        await pilot.press("f1")
        await pilot.pause()
        assert app.screen.markdown.startswith("# Activation offloading")
