"""Turn an allocation log into the peak, its breakdown, per-phase peaks and a timeline."""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.allocator import FREE
from memtui.engine.model.specs import COMPONENT_NAMES
from memtui.engine.trace.tracker import Allocation, MemoryLog

TENSOR_COMPONENTS = tuple(name for name in COMPONENT_NAMES if name != "overhead")


@dataclass
class PhasePeak:
    step: int
    phase: str
    start_bytes: int
    peak_bytes: int


@dataclass
class LogSummary:
    peak_bytes: int
    peak_event: int
    peak_step: int
    peak_phase: str
    breakdown: dict[str, int]  # category -> bytes live at the peak
    phases: list[PhasePeak]
    samples: list[tuple[int, int, str]]  # (event index, live bytes, phase), downsampled
    top_at_peak: list[Allocation]
    largest_allocation: int
    log: MemoryLog | None = None


def _phase_at(marks: list[tuple[int, int, str]]):
    """Iterator helper: for increasing event indices, the (step, phase) in force."""
    position = 0
    current = (0, "setup")

    def lookup(index: int) -> tuple[int, str]:
        nonlocal position, current
        while position < len(marks) and marks[position][0] <= index:
            current = (marks[position][1], marks[position][2])
            position += 1
        return current

    return lookup


def summarize(log: MemoryLog, *, max_samples: int = 400) -> LogSummary:
    allocations = log.allocations
    device = {alloc_id: not alloc.host for alloc_id, alloc in allocations.items()}
    live = 0
    peak = -1
    peak_event = 0
    phase_of = _phase_at(log.phase_marks)
    phases: list[PhasePeak] = []
    raw_samples: list[tuple[int, int, str]] = []
    peak_step, peak_phase = 0, "setup"
    largest = 0
    for index, event in enumerate(log.events):
        step, phase = phase_of(index)
        if not phases or (phases[-1].step, phases[-1].phase) != (step, phase):
            phases.append(PhasePeak(step=step, phase=phase, start_bytes=live, peak_bytes=live))
        if device[event.alloc_id]:
            live += event.delta
            largest = max(largest, event.delta)
        if live > phases[-1].peak_bytes:
            phases[-1].peak_bytes = live
        if live > peak:
            peak, peak_event, peak_step, peak_phase = live, index, step, phase
        raw_samples.append((index, live, f"{step}:{phase}"))

    alive = _alive_after(log, peak_event)  # the breakdown and the largest live tensors at the peak
    breakdown = {name: 0 for name in TENSOR_COMPONENTS}
    for alloc in alive.values():
        breakdown[alloc.category] = breakdown.get(alloc.category, 0) + alloc.nbytes
    top = sorted(alive.values(), key=lambda alloc: alloc.nbytes, reverse=True)[:15]

    stride = max(1, len(raw_samples) // max_samples)
    samples = raw_samples[::stride]
    return LogSummary(
        peak_bytes=max(peak, 0),
        peak_event=peak_event,
        peak_step=peak_step,
        peak_phase=peak_phase,
        breakdown=breakdown,
        phases=phases,
        samples=samples,
        top_at_peak=top,
        largest_allocation=largest,
        log=log,
    )


def _alive_after(log: MemoryLog, event_index: int) -> dict[int, Allocation]:
    """Replay the log: the device allocations live just after `event_index`."""
    alive: dict[int, Allocation] = {}
    for event in log.events[: event_index + 1]:
        alloc = log.allocations[event.alloc_id]
        if alloc.host:
            continue
        if event.delta > 0:
            alive[event.alloc_id] = alloc
        else:
            alive.pop(event.alloc_id, None)
    return alive


def allocations_at_event(log: MemoryLog, event_index: int) -> list[dict]:
    """The device allocations live just after `event_index`, largest first, as plain dicts."""
    alive = _alive_after(log, event_index)
    return [{"id": a.alloc_id, "bytes": a.nbytes, "category": a.category, "op": a.op, "phase": a.phase,
             "step": a.step, "shape": list(a.shape), "dtype": a.dtype, "module": a.module}
            for a in sorted(alive.values(), key=lambda a: a.nbytes, reverse=True)]


def allocation_sequence(log: MemoryLog, *, before_forward: tuple[int, ...] = ()) -> list[tuple[int, int, int]]:
    """The device allocations and frees in order, as the caching allocator sees them: (alloc id, bytes
    requested, stream) for an allocation, (alloc id, FREE, stream) for a free. `before_forward` adds allocations made at the
    first forward and never freed (the cuBLAS workspaces), keyed by negative ids."""
    first_forward = next((index for index, _step, phase in log.phase_marks if phase == "forward"), 0)
    allocations = log.allocations
    sequence: list[tuple[int, int, int]] = []
    for index, event in enumerate(log.events):
        if index == first_forward:
            sequence.extend((-1 - n, size, 0) for n, size in enumerate(before_forward))
        alloc = allocations[event.alloc_id]
        if alloc.host:
            continue
        sequence.append((event.alloc_id, alloc.raw_bytes if event.delta > 0 else FREE, alloc.stream))
    if first_forward >= len(log.events):
        sequence.extend((-1 - n, size, 0) for n, size in enumerate(before_forward))
    return sequence
