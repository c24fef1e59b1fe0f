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


# --compile: torchtune compiles each layer inside OffloadActivations. AOTAutograd's CompiledFunction saves the
# partitioner's tensors with ctx.save_for_backward, so the pack hook sees that set (not eager's), parameters among
# them as the Parameters themselves (dynamo marks them static: the partitioner saves them for free), which stay.
COMPILED = [
    dict(precision="bf16-true"),
    dict(precision="bf16-mixed", batch_size=2, seq_len=1024),
    dict(precision="bf16-true", lora_rank=8, lora_targets="all-linear"),
    # The checkpoint's recompute unpacks its input requiring grad, as SavedVariable::unpack restores it: the layer's
    # graph is the forward's (the estimate that recomputed on an input without grad: +4.0%, eager +5.8%)
    dict(precision="bf16-true", lora_rank=8, lora_targets="all-linear", checkpointing="full"),
]


@pytest.mark.parametrize("options", COMPILED, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_compiled_layers_offload_what_the_partitioner_saves(options):
    from memtui.engine.trace.runner import trace
    from tests.test_compile import small

    spec = small("llama-3.2-1b", vocab_size=256)  # a small vocabulary: the layers' backward is the peak
    config = TrainingConfig(**{**dict(model="llama-3.2-1b", gpu="h100-80gb", batch_size=1, seq_len=2048,
                                      compile=True, activation_offload=True), **options})
    traced, estimated = trace(config, model=spec), estimate(config, model=spec)
    assert traced.peak_phase == "backward"
    peak = estimated.tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(peak - traced.traced_tensor_peak_bytes) / traced.traced_tensor_peak_bytes < 0.002
    host = traced.budget.offloaded_activation_bytes
    assert abs(estimated.offloaded_activation_bytes - host) / host < 0.002
    # Not eager's figures: eager offloads more (the norms' fp32 copies, RoPE's and SiLU's intermediates, the
    # weights' transposes); under checkpointing both offload the layers' inputs alone.
    eager = estimate(config.model_copy(update={"compile": False}), model=spec)
    if config.checkpointing == "none":
        assert estimated.offloaded_activation_bytes < eager.offloaded_activation_bytes * 0.8
    assert not any("activation offloading" in note and "eager" in note for note in estimated.notes)


def test_a_compiled_layer_offloads_its_saved_set_and_keeps_its_weights():
    """Per layer, the host holds exactly the partitioner's saved tensors (tests/test_compile.py's count), none of
    the layer's weights (the trace that partitioned without marking them static offloaded their transposes): a weight is saved as the Parameter itself, which the pack hook leaves on the device."""
    from memtui.engine.trace.runner import trace
    from tests.test_trace import tiny_llama

    def host(layers: int) -> tuple[int, int]:
        config = TrainingConfig(model="llama-3.2-1b", precision="bf16-true", seq_len=256, compile=True,
                                activation_offload=True)
        spec = tiny_llama(layers)
        return (trace(config, model=spec).budget.offloaded_activation_bytes,
                estimate(config, model=spec).offloaded_activation_bytes)

    tokens, hidden, q, kv, heads, mlp = 256, 64, 64, 32, 4, 176
    saved = (2 * tokens * 4 + tokens * hidden * 2 + tokens * q * 2 + tokens * kv * 2 + tokens * kv * 2
             + tokens * q * 2 + heads * tokens * 4 + tokens * hidden * 2 + tokens * hidden * 2 + 3 * tokens * mlp * 2
             + tokens * hidden * 2)
    (traced3, estimated3), (traced2, estimated2) = host(3), host(2)
    # RoPE's cos and sin (bf16, head_dim 16): one pair on the device for every layer, but each layer's node saves
    # them (its backward recomputes RoPE), so each packs a host copy of its own
    rope = 2 * tokens * 16 * 2
    assert traced3 - traced2 == estimated3 - estimated2 == saved + rope
