"""The live run's CPU copy peaks in the same phase as the full-size configuration, with activations in it."""

from __future__ import annotations

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.live.devices import LocalDevice
from memtui.engine.live.plan import LiveOptions, make_plan
from memtui.engine.model.specs import TrainingConfig

GiB = 1 << 30
CPU = LocalDevice(kind="cpu", name="CPU (test)", memory_bytes=64 * GiB, free_bytes=32 * GiB)


@pytest.mark.parametrize("options", [
    dict(seq_len=8192),  # before: the copy (256 tokens) peaked in the optimizer step with no activations
    dict(model="llama-3.2-1b", seq_len=4096, batch_size=4),
    dict(model="qwen2.5-0.5b", seq_len=1024, batch_size=8),
    dict(precision="bf16-true", lora_rank=16, seq_len=4096),
    dict(),  # the default peaks in the optimizer step: so does its copy
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cpu_copy_peaks_in_the_full_configurations_phase(options):
    config = TrainingConfig(**options)
    full = estimate(config)
    plan = make_plan(config, LiveOptions(device="cpu"), CPU)
    assert plan.budget.peak_phase == full.peak_phase
    if full.per_gpu.activations > 0:
        assert plan.budget.per_gpu.activations > 0.2 * plan.budget.tensor_peak_bytes
    assert plan.estimated_seconds <= 40.0


def test_summary_says_a_component_zero_on_both_sides_was_not_tested():
    from memtui.engine.live.compare import build_summary

    plan = make_plan(TrainingConfig(model="llama-3.2-1b"), LiveOptions(device="cpu", layers=1, width=128, vocab=1024,
                                                                        seq_len=64, steps=2), CPU)
    components = {name: value for name, value in plan.predicted_components.items() if name != "overhead"}
    assert plan.budget.peak_phase == "optimizer" and components["activations"] == 0
    measured = {"tensor_peak_bytes": plan.predicted_tensor_peak, "device_peak_bytes": None, "components": components,
                "label": "CPU RSS"}
    summary = build_summary(plan, measured, result="completed", steps_completed=2, seconds=1.0, device={})
    assert summary["error_pct"]["components"]["activations"] is None
    assert any("not tested" in note and "activations" in note for note in summary["notes"])
    assert summary["error_pct"]["components"]["weights"] == 0.0
