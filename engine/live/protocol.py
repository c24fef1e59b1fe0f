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
    refused   {"reason"}                                 the plan does not fit (no --force)
    error     {"text"}                                   the worker failed; last line

Bytes are integers; N/A is null. `t` is seconds since the worker started.
"""

from __future__ import annotations

import json
from typing import Any

MESSAGE_TYPES = ("hello", "notice", "device", "plan", "sample", "phase", "step", "summary", "refused", "error")
FINAL_TYPES = ("summary", "refused", "error")
RESULTS = ("completed", "oom", "cancelled")


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
