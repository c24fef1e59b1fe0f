"""The samples of one run, aggregated the way every front end shows them.

Peaks are what matter, so peaks are never lost: a sample's `allocated_peak`
(the highest tensor bytes since the previous sample, tracked on every
allocation) counts toward the allocated curve, and downsampling for a chart
keeps the maximum of each bucket, not an average or the last value.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

# Sample fields a series keeps, in bytes (None: N/A in this run).
SERIES_FIELDS = ("allocated", "reserved", "nvml_used", "nvml_process", "rss")


@dataclass(frozen=True)
class PhaseMark:
    t: float
    step: int
    phase: str


class SampleSeries:
    def __init__(self, *, max_points: int = 50_000) -> None:
        self.max_points = max_points
        self.times: list[float] = []
        self.values: dict[str, list[int | None]] = {name: [] for name in SERIES_FIELDS}
        self.peaks: dict[str, int | None] = dict.fromkeys(SERIES_FIELDS)
        self.phases: list[PhaseMark] = []
        self.samples = 0  # samples received (the chart may hold fewer after decimation)

    # ---- input ------------------------------------------------------------------------
    def add(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "sample":
            self.add_sample(message)
        elif kind == "phase":
            self.phases.append(PhaseMark(t=float(message.get("t", 0.0)), step=int(message.get("step", 0)),
                                         phase=str(message.get("phase", ""))))

    def add_sample(self, sample: dict[str, Any]) -> None:
        self.samples += 1
        self.times.append(float(sample.get("t", 0.0)))
        for name in SERIES_FIELDS:
            value = _bytes_or_none(sample.get(name))
            if name == "allocated":
                # The highest point since the previous sample, so a peak inside a tick is on the curve.
                window_peak = _bytes_or_none(sample.get("allocated_peak"))
                if window_peak is not None and (value is None or window_peak > value):
                    value = window_peak
            self.values[name].append(value)
            if value is not None and (self.peaks[name] is None or value > self.peaks[name]):
                self.peaks[name] = value
        if len(self.times) > self.max_points:
            self._decimate()

    def _decimate(self) -> None:
        """Halve the points, keeping each pair's maximum (peaks survive long runs)."""
        odd = len(self.times) % 2 == 1  # the newest point has no partner yet: it stays as it is
        self.times = self.times[1::2] + (self.times[-1:] if odd else [])
        for name, values in self.values.items():
            pairs = zip(values[0::2], values[1::2], strict=False)  # zip drops the unpaired last point...
            self.values[name] = [_max(a, b) for a, b in pairs] + (values[-1:] if odd else [])  # ...kept here

    # ---- output -----------------------------------------------------------------------
    @property
    def duration(self) -> float:
        return self.times[-1] if self.times else 0.0

    def latest(self, name: str) -> int | None:
        values = self.values[name]
        for value in reversed(values):
            if value is not None:
                return value
        return None

    def peak(self, name: str) -> int | None:
        return self.peaks[name]

    def has(self, name: str) -> bool:
        return self.peaks[name] is not None

    def first_time(self, name: str) -> float | None:
        """When `name` was first measured (e.g. tensors exist only once the model is built)."""
        for t, value in zip(self.times, self.values[name], strict=True):
            if value is not None:
                return t
        return None

    def buckets(self, name: str, width: int, *, t_start: float = 0.0, t_end: float | None = None) -> list[int | None]:
        """`width` columns over [t_start, t_end]: the maximum of each column's samples (None if none)."""
        if width <= 0:
            return []
        end = t_end if t_end is not None else self.duration
        span = max(end - t_start, 1e-9)
        columns: list[int | None] = [None] * width
        for t, value in zip(self.times, self.values[name], strict=True):
            if value is None or t < t_start:
                continue
            column = min(width - 1, int((t - t_start) / span * width))
            current = columns[column]
            columns[column] = value if current is None else max(current, value)
        return columns

    def phase_columns(self, width: int, *, t_start: float = 0.0, t_end: float | None = None,
                      only: Collection[str] | None = None) -> list[str | None]:
        """The phase that begins in each column (of those in `only`, if given), None where none begins."""
        end = t_end if t_end is not None else self.duration
        span = max(end - t_start, 1e-9)
        columns: list[str | None] = [None] * max(width, 0)
        for mark in self.phases:
            if mark.t < t_start or (only is not None and mark.phase not in only):
                continue
            column = min(width - 1, int((mark.t - t_start) / span * width))
            if 0 <= column < width and columns[column] is None:
                columns[column] = mark.phase
        return columns


def _bytes_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
