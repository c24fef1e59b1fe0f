"""Live-run planning without torch: the scaled model, like-for-like prediction, refusals, the lock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.live import sizing
from memtui.engine.live.devices import LocalDevice, cpu_device
from memtui.engine.live.lock import RunLock, RunLockBusy
from memtui.engine.live.plan import LiveOptions, make_plan
from memtui.engine.live.process import preflight
from memtui.engine.live.protocol import decode, encode, error_pct
from memtui.engine.model.presets import resolve_model
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.units import GiB

CPU = LocalDevice(kind="cpu", name="CPU (test)", memory_bytes=64 * GiB, free_bytes=32 * GiB)
GPU = LocalDevice(kind="cuda", name="NVIDIA L4", memory_bytes=24 * GiB, free_bytes=22 * GiB,
                  compute_capability="8.9", nvml=True)


def test_scaled_model_keeps_family_head_dim_and_gqa_ratio():
    config = TrainingConfig(model="llama-3.1-8b", lora_rank=16, checkpointing="full")
    plan = make_plan(config, LiveOptions(device="cpu"), CPU)
    full, scaled = plan.full_spec, plan.spec
    assert scaled.family == full.family and scaled.head_dim == full.head_dim
    assert scaled.num_heads // scaled.num_kv_heads == full.num_heads // full.num_kv_heads
    assert scaled.num_layers < full.num_layers and scaled.hidden_size <= 512
    # every training option is kept; only the workload shrinks
    assert plan.config.model_copy(update={"seq_len": config.seq_len, "batch_size": config.batch_size}) == config
    assert not plan.refusal and plan.fits


def test_prediction_is_the_estimators_for_the_scaled_run_as_run():
    config = TrainingConfig(model="llama-3.2-1b", precision="16-mixed")
    plan = make_plan(config, LiveOptions(device="cuda", layers=3, steps=4), GPU)
    assert plan.spec.num_layers == 3 and plan.steps == 4
    budget = estimate(plan.config, model=plan.spec, gpu=GPU.gpu_spec())
    assert plan.predicted_tensor_peak == budget.tensor_peak_bytes
    assert plan.predicted_device_peak == budget.device_peak_bytes
    assert plan.as_json()["predicted"]["components"] == budget.per_gpu.model_dump()


def test_cpu_prediction_drops_cuda_only_parts_and_adds_the_runtime():
    config = TrainingConfig(model="llama-3.2-1b")
    plan = make_plan(config, LiveOptions(device="cpu"), CPU, runtime_bytes=700 << 20)
    budget = estimate(plan.config, model=plan.spec, gpu=CPU.gpu_spec())
    workspace = -plan.adjustments["cublas_workspace_bytes"]
    assert plan.predicted_tensor_peak == budget.tensor_peak_bytes - workspace
    assert plan.predicted_device_peak == plan.predicted_tensor_peak + (700 << 20)
    plan.set_cpu_runtime(800 << 20)  # measured again once the model is built
    assert plan.predicted_device_peak == plan.predicted_tensor_peak + (800 << 20)


def test_user_sizes_are_kept_and_checked():
    config = TrainingConfig(model="llama-3.2-1b")
    plan = make_plan(config, LiveOptions(device="cpu", layers=3, width=256, vocab=2048, seq_len=128), CPU)
    assert (plan.spec.num_layers, plan.spec.vocab_size, plan.config.seq_len) == (3, 2048, 128)
    assert plan.spec.hidden_size == 256
    with pytest.raises(InputError, match="--layers"):
        make_plan(config, LiveOptions(device="cpu", layers=999), CPU)
    with pytest.raises(InputError, match="--device"):
        LiveOptions(device="tpu").validate()


def test_shrinks_until_it_fits_the_share_of_free_memory():
    config = TrainingConfig(model="llama-3.1-8b", seq_len=4096, batch_size=8)
    small = LocalDevice(kind="cuda", name="small", memory_bytes=8 * GiB, free_bytes=8 * GiB, compute_capability="8.0")
    plan = make_plan(config, LiveOptions(device="cuda"), small)
    assert plan.fits and plan.predicted_device_peak <= 2 * GiB  # default: at most 1/4 of what is free
    assert plan.changes  # and says what it changed


def test_refuses_what_does_not_fit_unless_forced():
    config = TrainingConfig(model="llama-3.2-1b")
    options = dict(device="cpu", layers=2, capacity_bytes=1 << 20)
    plan = make_plan(config, LiveOptions(**options), CPU)
    assert plan.refusal and "--force" in plan.refusal and not plan.fits
    forced = make_plan(config, LiveOptions(**options, force=True), CPU)
    assert not forced.refusal


def test_cuda_only_options_on_cpu_refuse_or_skip():
    config = TrainingConfig(model="llama-3.2-1b", quant="nf4", lora_rank=16, optimizer="adamw-8bit")
    refused = make_plan(config, LiveOptions(device="cpu"), CPU)
    assert refused.refusal.startswith("--quant") and "--if-unsupported skip" in refused.refusal
    skipped = make_plan(config, LiveOptions(device="cpu", if_unsupported="skip"), CPU)
    assert not skipped.refusal and skipped.config.quant == "none" and skipped.config.optimizer == "adamw"
    assert len(skipped.notices) == 2 and all("CUDA" in notice for notice in skipped.notices)
    assert skipped.config.lora_rank == 16  # LoRA itself runs on a CPU
    on_gpu = make_plan(config, LiveOptions(device="cuda"), GPU)
    assert not on_gpu.refusal and on_gpu.config.quant == "nf4"


def test_hybrid_sharding_is_refused_or_dropped_never_run_as_plain_fsdp2():
    config = TrainingConfig(model="llama-3.2-1b", gpus=4, zero=3, shard_group=2)
    refused = make_plan(config, LiveOptions(device="cpu"), CPU)
    assert refused.refusal.startswith("--shard-group") and "--if-unsupported skip" in refused.refusal
    skipped = make_plan(config, LiveOptions(device="cpu", if_unsupported="skip"), CPU)
    assert not skipped.refusal and skipped.config.shard_group == 0
    assert any("hybrid sharding" in notice for notice in skipped.notices)


def test_without_nvml_auto_runs_on_the_cpu(monkeypatch):
    monkeypatch.setenv("MEMTUI_NO_NVML", "1")
    checked = preflight(TrainingConfig(model="llama-3.2-1b"), LiveOptions(device="auto", steps=1))
    assert checked.device_kind == "cpu" and checked.plan is not None and "NVML disabled" in checked.note
    assert checked.plan.device.label == "CPU RSS"
    assert cpu_device().nvml is False


def test_scaled_config_is_a_loadable_hf_config():
    transformers = pytest.importorskip("transformers")
    full = resolve_model("llama-3.2-1b")
    shape = sizing.initial_shape(full, 256, 1, sizing.CPU_DEFAULTS)
    hf = sizing.scaled_config(full, shape)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if not k.startswith("_")})
    assert config.num_hidden_layers == shape.layers and config.vocab_size == shape.vocab


def test_protocol_round_trip_and_error_pct():
    message = {"type": "sample", "t": 0.05, "allocated": 1, "reserved": None, "nvml_used": None, "rss": 5}
    assert decode(encode(message)) == message
    assert decode("Some library printed this") is None and decode('{"type": "other"}') is None
    assert error_pct(110, 100) == 10.0 and error_pct(None, 100) is None and error_pct(1, 0) is None


def test_one_live_run_per_machine(tmp_path):
    path = tmp_path / "live.lock"
    with RunLock(path).acquire("first"):
        with pytest.raises(RunLockBusy, match=r"first, pid \d+"):
            RunLock(path).acquire("second")
    RunLock(path).acquire("third").release()  # free again once released


def test_a_killed_holder_releases_the_lock(tmp_path):
    path = tmp_path / "live.lock"
    code = f"from memtui.engine.live.lock import RunLock; RunLock(__import__('pathlib').Path({str(path)!r})).acquire('child'); print('held', flush=True); import time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockBusy):
            RunLock(path).acquire()
        child.kill()
        child.wait(5)
        RunLock(path).acquire().release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_summary_gives_no_percent_error_for_a_negligible_component():
    from memtui.engine.live.compare import build_summary

    plan = make_plan(TrainingConfig(model="llama-3.2-1b"), LiveOptions(device="cpu", layers=1, width=128, vocab=1024,
                                                                        seq_len=64, steps=2), CPU)
    peak = plan.predicted_tensor_peak
    components = dict(plan.predicted_components)
    components.pop("overhead", None)
    components["activations"] = 2048  # a few KiB measured where none were predicted at the peak
    measured = {"tensor_peak_bytes": peak, "device_peak_bytes": None, "components": components, "label": "CPU RSS"}
    summary = build_summary(plan, measured, result="completed", steps_completed=2, seconds=1.0, device={})
    errors = summary["error_pct"]["components"]
    assert errors["weights"] == 0.0 and errors["activations"] is None


def test_a_cuda_run_predicts_the_reserved_peak_its_allocator_will_report():
    """The scaled step replayed through the allocator model, over as many steps as the run trains, and its error
    against torch.cuda.max_memory_reserved in the summary; a CPU run has no reserved memory to compare."""
    from memtui.engine.estimator.reserved import with_reserved
    from memtui.engine.live.compare import build_summary
    from memtui.engine.live.protocol import Summary

    plan = make_plan(TrainingConfig(model="llama-3.2-1b"), LiveOptions(device="cuda", layers=2, steps=3), GPU)
    replayed = with_reserved(estimate(plan.config, model=plan.spec, gpu=GPU.gpu_spec()), plan.config, plan.spec,
                             GPU.gpu_spec(), steps=3)
    predicted = plan.as_json()["predicted"]
    assert predicted["reserved_peak_bytes"] == replayed.reserved_peak_bytes > plan.predicted_tensor_peak
    assert predicted["fragmentation_bytes"] == replayed.fragmentation_bytes
    measured = {"tensor_peak_bytes": plan.predicted_tensor_peak, "device_peak_bytes": plan.predicted_device_peak,
                "reserved_peak_bytes": replayed.reserved_peak_bytes // 2, "label": "NVML"}
    summary = Summary.model_validate(build_summary(plan, measured, result="completed", steps_completed=3,
                                                      seconds=1.0, device={}))
    assert summary.error_pct.reserved_peak == 100.0 and summary.predicted.reserved_peak_bytes > 0

    cpu_plan = make_plan(TrainingConfig(model="llama-3.2-1b"), LiveOptions(device="cpu", layers=1, width=128,
                                                                            vocab=1024, seq_len=64, steps=2), CPU)
    assert cpu_plan.as_json()["predicted"]["reserved_peak_bytes"] is None


def test_seq_lens_give_each_step_its_length_scaled_with_the_copy_and_replayed_on_cuda():
    from memtui.engine.estimator.reserved import with_reserved

    config = TrainingConfig(model="llama-3.2-1b", seq_len=2048)
    plan = make_plan(config, LiveOptions(device="cuda", layers=2, steps=4, seq_lens="512,2048,1024"), GPU)
    assert plan.seq_lens == (512, 2048, 1024, 512) and plan.config.seq_len == 2048  # cycled; the longest sizes it
    replayed = with_reserved(estimate(plan.config, model=plan.spec, gpu=GPU.gpu_spec()), plan.config, plan.spec,
                             GPU.gpu_spec(), seq_lens=plan.seq_lens, steps=3)
    assert plan.as_json()["predicted"]["reserved_peak_bytes"] == replayed.reserved_peak_bytes
    assert plan.scaled_model_json()["seq_lens"] == [512, 2048, 1024, 512]

    cpu = make_plan(config, LiveOptions(device="cpu", layers=1, width=128, vocab=1024, seq_len=256, steps=3,
                                        seq_lens="512,2048,1024"), CPU)
    assert cpu.seq_lens == (64, 256, 128)  # the copy runs at 256 tokens: each length shrinks by the same factor

    with pytest.raises(InputError, match="--seq-lens"):
        make_plan(config, LiveOptions(device="cpu", seq_lens="uniform:9-3"), CPU)
