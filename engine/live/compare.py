"""Predicted beside measured, and the full-size model calibrated from the run.

Calibration uses the per-layer cost, the one part of a step a scaled run can
measure and the full model repeats: the bytes a decoder layer holds at the
moment the forward pass ends (its weights, its optimizer states and what its
forward saved for backward). The run measures it with hooks around each layer;
the estimator predicts it as the growth of its end-of-forward total per added
layer. Their ratio corrects the full model's per-layer part:

    calibrated = analytic + layers_per_gpu x predicted_per_layer_full x (measured / predicted - 1)

applied when the full model's peak is at the end of the forward pass (where
every layer's activations are alive); at an optimizer-step peak no activation
is alive and there is nothing to calibrate.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.live import sizing
from memtui.engine.live.plan import RunPlan
from memtui.engine.live.protocol import Summary, error_pct
from memtui.engine.model.specs import Budget

_END_OF_FORWARD = "loss"  # the estimator's moment when the forward pass has saved everything


def _moment(budget: Budget, phase: str) -> int:
    for point in budget.timeline:
        if point.phase == phase:
            return point.bytes
    return budget.tensor_peak_bytes


def predicted_per_layer(plan: RunPlan) -> int:
    """The estimator's end-of-forward bytes per decoder layer, for the scaled run as run."""
    deeper = sizing.scaled_spec(plan.full_spec, replace(plan.shape, layers=plan.shape.layers + 1))
    budget = estimate(plan.config, model=deeper, gpu=plan.device.gpu_spec())
    return _moment(budget, _END_OF_FORWARD) - _moment(plan.budget, _END_OF_FORWARD)


def full_model_calibration(plan: RunPlan, measured_per_layer: int | None, context_delta: int = 0) -> dict[str, Any] | None:
    """The full-size model's analytic figures and the ones calibrated by this run; None if not computable."""
    requested = plan.requested
    full = plan.full_spec
    try:
        analytic = estimate(requested, model=full)
        if full.num_layers > 1:
            shallower = sizing.Shape(layers=full.num_layers - 1, kv_heads=full.num_kv_heads, vocab=full.vocab_size,
                                     seq_len=requested.seq_len, batch_size=requested.batch_size)
            lighter = estimate(requested, model=sizing.scaled_spec(full, shallower))
            full_per_layer = _moment(analytic, _END_OF_FORWARD) - _moment(lighter, _END_OF_FORWARD)
        else:
            full_per_layer = 0
        scaled_per_layer = predicted_per_layer(plan)
    except InputError:
        return None
    result: dict[str, Any] = {
        "id": full.id, "gpu": requested.gpu, "config": requested.model_dump(mode="json"),
        "analytic_tensor_peak_bytes": analytic.tensor_peak_bytes,
        "analytic_device_peak_bytes": analytic.device_peak_bytes,
        "analytic_peak_phase": analytic.peak_phase,
        "per_layer": {"predicted_bytes": scaled_per_layer, "measured_bytes": measured_per_layer,
                      "full_predicted_bytes": full_per_layer},
        "calibrated_tensor_peak_bytes": None, "calibrated_device_peak_bytes": None, "note": "",
    }
    if measured_per_layer is None or scaled_per_layer <= 0:
        result["note"] = "the per-layer cost was not measured (fewer than two steps, or no decoder layers found)"
        return result
    ratio = measured_per_layer / scaled_per_layer
    result["per_layer"]["ratio"] = round(ratio, 4)
    layers_per_gpu = -(-full.num_layers // requested.pp)
    correction = 0
    if analytic.peak_phase in ("forward", _END_OF_FORWARD):
        correction = int(layers_per_gpu * full_per_layer * (ratio - 1.0))
    else:
        result["note"] = f"the full model peaks in {analytic.peak_phase}, where no layer's activations are alive"
    if plan.config != plan.requested.model_copy(update={"seq_len": plan.config.seq_len, "batch_size": plan.config.batch_size}):
        result["note"] = (result["note"] + "; " if result["note"] else "") + "the run dropped options the full configuration uses"
    result["calibrated_tensor_peak_bytes"] = analytic.tensor_peak_bytes + correction
    result["calibrated_device_peak_bytes"] = analytic.device_peak_bytes + correction + context_delta
    return result


def build_summary(
    plan: RunPlan, measured: dict[str, Any], *, result: str, steps_completed: int, seconds: float,
    device: dict[str, Any], oom: dict[str, Any] | None = None, notes: list[str] | None = None,
    measured_per_layer: int | None = None, context_delta: int = 0,
) -> dict[str, Any]:
    predicted = plan.predicted_json()
    # An OOM or a cancel measured part of a run: no error against a whole step's prediction.
    comparable = result == "completed"
    components_error = {}
    measured_components = measured.get("components") or {}
    # A component under 1% of the peak on both sides (a few KiB of activations) has no meaningful % error.
    negligible = 0.01 * (measured.get("tensor_peak_bytes") or 0)
    untested = []
    for name, value in measured_components.items():
        expected = predicted["components"].get(name)
        tiny = max(expected or 0, value or 0) < negligible
        components_error[name] = error_pct(expected, value) if comparable and not tiny else None
        if comparable and not expected and not value:
            untested.append(name)  # nothing at the peak on either side: the run says nothing about its model
    checks = ([f"not tested by this run (zero at the peak, predicted and measured): {', '.join(untested)}"]
              if untested else [])
    return Summary(
        result=result,
        steps=plan.steps,
        steps_completed=steps_completed,
        seconds=round(seconds, 3),
        predicted=predicted,
        measured=measured,
        error_pct={
            "tensor_peak": error_pct(plan.predicted_tensor_peak, measured.get("tensor_peak_bytes")) if comparable else None,
            "device_peak": error_pct(plan.predicted_device_peak, measured.get("device_peak_bytes")) if comparable else None,
            # torch.cuda.max_memory_reserved against the allocator replay (CUDA only; None on a CPU)
            "reserved_peak": error_pct(predicted.get("reserved_peak_bytes"), measured.get("reserved_peak_bytes"))
            if comparable else None,
            "components": components_error,
        },
        scaled_model=plan.scaled_model_json(),
        device=device,
        full_model=full_model_calibration(plan, measured_per_layer, context_delta) if result == "completed" else None,
        oom=oom,
        notes=list(plan.notices) + list(notes or []) + checks,
    ).message()
