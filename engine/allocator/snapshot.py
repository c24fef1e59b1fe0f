"""A recorded memory snapshot (torch.cuda.memory._dump_snapshot), replayed through the allocator model.

The snapshot is a pickle of plain containers: `segments` (what is reserved when it was taken) and
`device_traces` (per device, the allocator's actions: alloc, free_requested, free_completed,
segment_alloc, segment_free, segment_map, segment_unmap, oom, ...). It is read with an unpickler that
builds nothing but builtin containers and scalars: a file naming any other class is refused.
"""

from __future__ import annotations

import builtins
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

from memtui.engine.allocator.caching import CachingAllocator, OutOfMemory
from memtui.engine.allocator.config import AllocatorConfig, parse_alloc_conf
from memtui.engine.errors import InputError

SNAPSHOT_FIELD = "SNAPSHOT"
_CONTAINERS = frozenset({"dict", "list", "tuple", "set", "frozenset", "bytearray"})
_GROW = {"segment_alloc", "segment_map"}
_SHRINK = {"segment_free", "segment_unmap"}


class _ContainersOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if module == "builtins" and name in _CONTAINERS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a builtin container")


def load_snapshot(path: str | Path) -> dict:
    """The snapshot's dict; a missing file, not a pickle, or one that names a class: InputError."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputError(SNAPSHOT_FIELD, f"cannot read {path}: {error.strerror or error}",
                         "a file written by torch.cuda.memory._dump_snapshot") from None
    try:
        snapshot = _ContainersOnly(io.BytesIO(data)).load()
    except Exception as error:  # any malformed pickle: one line, no traceback
        raise InputError(SNAPSHOT_FIELD, f"{path} is not a memory snapshot ({error})",
                         "a pickle of dicts and lists from torch.cuda.memory._dump_snapshot") from None
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("device_traces"), list) \
            or not isinstance(snapshot.get("segments"), list):
        raise InputError(SNAPSHOT_FIELD, f"{path} has no 'segments' and 'device_traces'",
                         "a snapshot recorded with torch.cuda.memory._record_memory_history")
    return snapshot


def recorded_alloc_conf(snapshot: dict) -> str:
    """The PYTORCH_CUDA_ALLOC_CONF the run had, when the snapshot carries it."""
    settings = snapshot.get("allocator_settings")
    value = settings.get("PYTORCH_CUDA_ALLOC_CONF") if isinstance(settings, dict) else None
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Divergence:
    event: int
    action: str
    predicted_reserved_bytes: int
    recorded_reserved_bytes: int


@dataclass(frozen=True)
class SnapshotReplay:
    device: int
    alloc_conf: str
    trace_events: int
    allocations: int
    frees: int
    complete: bool  # the trace starts with nothing reserved and every free has its allocation
    recorded_start_bytes: int  # reserved before the first recorded event
    predicted_reserved_peak_bytes: int
    recorded_reserved_peak_bytes: int
    predicted_reserved_end_bytes: int
    recorded_reserved_end_bytes: int
    predicted_allocated_peak_bytes: int
    predicted_segments_end: int
    recorded_segments_end: int
    recorded_ooms: int
    predicted_oom_event: int | None
    first_divergence: Divergence | None

    def as_json(self) -> dict:
        def error_pct(predicted: int, recorded: int) -> float | None:
            return round(100 * (predicted - recorded) / recorded, 3) if recorded else None

        return {
            "device": self.device,
            "alloc_conf": self.alloc_conf,
            "trace_events": self.trace_events,
            "allocations": self.allocations,
            "frees": self.frees,
            "complete": self.complete,
            "recorded_start_bytes": self.recorded_start_bytes,
            "predicted": {"reserved_peak_bytes": self.predicted_reserved_peak_bytes,
                          "reserved_end_bytes": self.predicted_reserved_end_bytes,
                          "allocated_peak_bytes": self.predicted_allocated_peak_bytes,
                          "segments_end": self.predicted_segments_end,
                          "oom_event": self.predicted_oom_event},
            "recorded": {"reserved_peak_bytes": self.recorded_reserved_peak_bytes,
                         "reserved_end_bytes": self.recorded_reserved_end_bytes,
                         "segments_end": self.recorded_segments_end,
                         "ooms": self.recorded_ooms},
            "error_pct": {"reserved_peak": error_pct(self.predicted_reserved_peak_bytes,
                                                     self.recorded_reserved_peak_bytes),
                          "reserved_end": error_pct(self.predicted_reserved_end_bytes,
                                                    self.recorded_reserved_end_bytes)},
            "first_divergence": None if self.first_divergence is None else vars(self.first_divergence),
        }


def _default_device(snapshot: dict) -> int:
    traces = snapshot["device_traces"]
    for index, trace in enumerate(traces):
        if trace:
            return index
    return 0


def replay_snapshot(snapshot: dict, config: AllocatorConfig | None = None, *, device: int | None = None,
                    device_total: int = 80 << 30) -> SnapshotReplay:
    """Replay one device's recorded allocations and frees; compare reserved memory after every one."""
    traces = snapshot["device_traces"]
    device = _default_device(snapshot) if device is None else device
    if not 0 <= device < max(len(traces), 1):
        raise InputError("--device-index", f"{device} is not a device of this snapshot",
                         f"0-{max(len(traces) - 1, 0)}")
    trace = traces[device] if traces else []
    conf_text = recorded_alloc_conf(snapshot) if config is None else config.text
    config = parse_alloc_conf(conf_text) if config is None else config

    segments = [s for s in snapshot["segments"] if isinstance(s, dict) and s.get("device", device) == device]
    recorded_end = sum(int(s.get("total_size", 0)) for s in segments)
    net = 0
    for entry in trace:
        action = entry.get("action")
        if action in _GROW:
            net += int(entry["size"])
        elif action in _SHRINK:
            net -= int(entry["size"])
    recorded_start = recorded_end - net

    model = CachingAllocator(config, device_total=device_total)
    live: dict[int, object] = {}
    recorded = recorded_start
    recorded_peak = recorded_start
    allocations = frees = orphans = ooms = 0
    predicted_oom = None
    divergence = None
    for index, entry in enumerate(trace):
        action = entry.get("action")
        if action in _GROW:
            recorded += int(entry["size"])
            recorded_peak = max(recorded_peak, recorded)
            continue
        if action in _SHRINK:
            recorded -= int(entry["size"])
            continue
        if action == "oom":
            ooms += 1
            continue
        if action == "alloc":
            allocations += 1
            try:
                live[int(entry["addr"])] = model.malloc(int(entry["size"]), int(entry.get("stream", 0)))
            except OutOfMemory:
                predicted_oom = index if predicted_oom is None else predicted_oom
                continue
        elif action == "free_completed":
            block = live.pop(int(entry["addr"]), None)
            if block is None:
                orphans += 1
                continue
            frees += 1
            model.free(block)
        else:
            continue
        if divergence is None and model.reserved != recorded - recorded_start:
            divergence = Divergence(index, str(action), model.reserved, recorded - recorded_start)

    return SnapshotReplay(
        device=device,
        alloc_conf=conf_text,
        trace_events=len(trace),
        allocations=allocations,
        frees=frees,
        complete=recorded_start == 0 and orphans == 0,
        recorded_start_bytes=recorded_start,
        predicted_reserved_peak_bytes=model.reserved_peak + recorded_start,
        recorded_reserved_peak_bytes=recorded_peak,
        predicted_reserved_end_bytes=model.reserved + recorded_start,
        recorded_reserved_end_bytes=recorded_end,
        predicted_allocated_peak_bytes=model.allocated_peak,
        predicted_segments_end=model.held_segments(),
        recorded_segments_end=len(segments),
        recorded_ooms=ooms,
        predicted_oom_event=predicted_oom,
        first_divergence=divergence,
    )
