"""The messages a live worker streams, one JSON object per line on stdout.

Every message has a "type". In order of appearance:

    hello     {"pid", "t"}                               worker started
    notice    {"level": "info"|"warning", "text"}        e.g. an option that needs CUDA
    device    {"kind": "cpu"|"cuda", "name", "memory_bytes", "free_bytes", "label",
               "nvml": {"available", "reason", ...}, "context_bytes", "baseline_bytes"}
    plan      {"scaled_model", "config", "steps", "predicted", "target_bytes", "fits"}
              (again on a CPU once the model is built: the runtime measured then)
    sample    {"t", "allocated", "reserved", "nvml_used", "rss", "allocated_peak",
               "nvml_process", "step", "phase"}                     >= 20 per second
    phase     {"t", "step", "phase", "allocated"}        forward, loss, backward, optimizer, end
    step      {"t", "step", "steps", "loss", "seconds"}  a step finished
    summary   {"result", "predicted", "measured", "error_pct", "scaled_model", "device", ...}  last
              (typed: `Summary`; a run that did not complete has partial figures and no error_pct)
    refused   {"reason"}                                 the plan does not fit (no --force)
    error     {"text"}                                   the worker failed; last line

Bytes are integers; N/A is null. `t` is seconds since the worker started.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MESSAGE_TYPES = ("hello", "notice", "device", "plan", "sample", "phase", "step", "summary", "refused", "error")
FINAL_TYPES = ("summary", "refused", "error")
RESULTS = ("completed", "oom", "cancelled")
Result = Literal["completed", "oom", "cancelled"]


class Cancelled(BaseException):
    """Raised in the worker's main thread by the cancel signal; BaseException so no library swallows it."""


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def decode(line: str | bytes) -> dict[str, Any] | None:
    """A message, or None for a line that is not one (torch or a library printed something)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") not in MESSAGE_TYPES:
        return None
    return message


def error_pct(predicted: int | None, measured: int | None) -> float | None:
    """(predicted - measured) / measured in %, None when either is N/A."""
    if predicted is None or measured is None or measured <= 0:
        return None
    return round(100.0 * (predicted - measured) / measured, 2)


def is_final(message: dict[str, Any]) -> bool:
    """The stream's last message: a summary, a refusal or an error."""
    return message.get("type") in FINAL_TYPES


# ---- the summary, typed ----------------------------------------------------------------------
# Every model keeps fields it does not name (extra="allow"), so a newer worker's additions pass through.


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class PredictedFigures(_Record):
    tensor_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    components: dict[str, int] = Field(default_factory=dict)
    peak_phase: str | None = None
    reserved_peak_bytes: int | None = None  # the allocator replay (CUDA runs)
    fragmentation_bytes: int | None = None


class MeasuredFigures(_Record):
    label: str = "device"
    tensor_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    components: dict[str, int | None] | None = None
    peak_phase: str | None = None
    peak_step: int | None = None
    samples: int | None = None
    reserved_peak_bytes: int | None = None  # torch.cuda.max_memory_reserved (None on a CPU)


class ErrorPercents(_Record):
    """(predicted - measured) / measured in %; None where not comparable (a partial run, a negligible part)."""

    tensor_peak: float | None = None
    device_peak: float | None = None
    reserved_peak: float | None = None
    components: dict[str, float | None] = Field(default_factory=dict)


class OomReport(_Record):
    at_bytes: int
    after_step: int = 0
    phase: str = ""
    message: str = ""


class PerLayer(_Record):
    predicted_bytes: int
    measured_bytes: int | None = None
    full_predicted_bytes: int = 0
    ratio: float | None = None


class FullModelCalibration(_Record):
    id: str
    gpu: str
    config: dict[str, Any] = Field(default_factory=dict)
    analytic_tensor_peak_bytes: int
    analytic_device_peak_bytes: int
    analytic_peak_phase: str = ""
    per_layer: PerLayer
    calibrated_tensor_peak_bytes: int | None = None
    calibrated_device_peak_bytes: int | None = None
    note: str = ""


class Summary(_Record):
    """The worker's last message of a run that started."""

    type: Literal["summary"] = "summary"
    result: Result
    steps: int | None = None
    steps_completed: int = 0
    seconds: float = 0.0
    predicted: PredictedFigures | None = None
    measured: MeasuredFigures = Field(default_factory=MeasuredFigures)
    error_pct: ErrorPercents = Field(default_factory=ErrorPercents)
    scaled_model: dict[str, Any] | None = None
    device: dict[str, Any] = Field(default_factory=dict)
    full_model: FullModelCalibration | None = None
    oom: OomReport | None = None
    notes: list[str] = Field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every step ran: only then are the measured figures a whole run's, comparable with the prediction."""
        return self.result == "completed"

    def message(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def cancelled_summary(steps_completed: int = 0, steps: int | None = None, note: str = "cancelled before the end",
                      **fields: Any) -> dict[str, Any]:
    """A cancelled run's summary where the worker could not send its own (stopped before it could say)."""
    return Summary(result="cancelled", steps=steps, steps_completed=steps_completed, notes=[note],
                   **fields).message()
