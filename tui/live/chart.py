"""A chart of measured memory over time, with the predicted peak and the device capacity as lines.

Each column is the maximum of the samples that fall in it (peaks survive any
width), drawn as a bar with eighth-block resolution. The predicted peak is a
dashed line, the capacity a solid one (named in the legend when it is far above
the curve), the device-level measurement (NVML) dots above the bars, and the
row under the plot marks where each step phase begins.
"""

from __future__ import annotations

from itertools import groupby
from operator import itemgetter

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from memtui.engine.telemetry.series import SampleSeries
from memtui.engine.units import GiB

_EIGHTHS = " ▁▂▃▄▅▆▇█"
# The loss is a short moment between forward and backward: at chart resolution it would hide B.
PHASE_LETTERS = {"forward": "F", "backward": "B", "optimizer": "O"}
_AXIS_WIDTH = 11


def format_axis(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= 0.1 * GiB else f"{n_bytes / GiB:.3f} GiB"


class MemoryChart(Widget):
    COMPONENT_CLASSES = {
        "memory-chart--measured",
        "memory-chart--device",
        "memory-chart--predicted",
        "memory-chart--capacity",
        "memory-chart--axis",
        "memory-chart--phase",
    }

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.series = SampleSeries()
        self.predicted_peak: int | None = None
        self.capacity: int | None = None
        self.device_field: str | None = None  # "nvml_process" or "nvml_used" on CUDA; None on a CPU
        self.device_label = "NVML"
        self.measured_label = "allocated"
        self.placeholder = "no run yet"

    def show(self, series: SampleSeries, *, predicted_peak: int | None, capacity: int | None,
             device_field: str | None = None, measured_label: str = "allocated", placeholder: str = "") -> None:
        self.series = series
        self.predicted_peak = predicted_peak
        self.capacity = capacity
        self.device_field = device_field
        self.measured_label = measured_label
        if placeholder:
            self.placeholder = placeholder
        self.refresh()

    def _style(self, name: str) -> Style:
        return self.get_component_rich_style(f"memory-chart--{name}")

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        plot_width = max(1, width - _AXIS_WIDTH)
        plot_height = max(1, height - 3)  # legend row, phase row, time row
        series = self.series
        text = Text(no_wrap=True, overflow="crop")
        # Time runs from the first tensor measurement: before it the worker is importing torch.
        start = series.first_time("allocated") or 0.0
        measured = series.buckets("allocated", plot_width, t_start=start)
        device = None
        if self.device_field and series.has(self.device_field):
            device = series.buckets(self.device_field, plot_width, t_start=start)
        peaks = [p for p in (self.predicted_peak, series.peak("allocated"),
                             series.peak(self.device_field) if device else None) if p]
        top = max(peaks) * 1.15 if peaks else GiB
        capacity_on_scale = self.capacity is not None and self.capacity <= top * 1.6
        if capacity_on_scale and self.capacity:
            top = max(top, self.capacity * 1.02)

        legend = self._legend(capacity_on_scale)
        legend.truncate(width, overflow="ellipsis")
        text.append_text(legend)
        text.append("\n")
        if series.samples == 0:
            for row in range(plot_height):
                line = self.placeholder if row == plot_height // 2 else ""
                text.append(" " * _AXIS_WIDTH + line.center(plot_width)[:plot_width] + "\n", self._style("axis"))
            text.append("\n")
            return text

        def row_of(value: float) -> int:
            return plot_height - 1 - min(plot_height - 1, int(value / top * plot_height))

        predicted_row = row_of(self.predicted_peak) if self.predicted_peak else None
        capacity_row = row_of(self.capacity) if capacity_on_scale and self.capacity else None
        device_rows = [row_of(v) if v is not None else None for v in device] if device else None
        for row in range(plot_height):
            label = ""
            if row == 0:
                label = format_axis(top)
            elif row == predicted_row:
                label = format_axis(self.predicted_peak or 0)
            elif row == plot_height - 1:
                label = "0"
            text.append(label.rjust(_AXIS_WIDTH - 1)[: _AXIS_WIDTH - 1] + "│", self._style("axis"))
            cells = []
            for column in range(plot_width):
                value = measured[column]
                level = 0.0 if value is None else value / top * plot_height
                filled = level - (plot_height - 1 - row)  # how much of this cell the bar covers
                if filled >= 1:
                    cells.append(("█", "measured"))
                elif filled > 0:
                    cells.append((_EIGHTHS[max(1, int(filled * 8))], "measured"))
                elif device_rows is not None and device_rows[column] == row:
                    cells.append(("•", "device"))
                elif row == capacity_row:
                    cells.append(("━", "capacity"))
                elif row == predicted_row:
                    cells.append(("╌", "predicted"))
                else:
                    cells.append((" ", ""))
            self._append_runs(text, cells)
            text.append("\n")
        phases = series.phase_columns(plot_width, t_start=start, only=PHASE_LETTERS)
        text.append(" " * (_AXIS_WIDTH - 1) + "└", self._style("axis"))
        self._append_runs(text, [(PHASE_LETTERS.get(phase or "", " "), "phase") for phase in phases])
        text.append("\n")
        end = f"{series.duration:.1f} s"
        begin = f"{start:.1f} s"
        text.append(" " * _AXIS_WIDTH + begin.ljust(max(0, plot_width - len(end))) + end, self._style("axis"))
        return text

    def _append_runs(self, text: Text, cells: list[tuple[str, str]]) -> None:
        """Append (character, style name) cells as one span per run of a style: a chart redrawn ten times a
        second as thousands of one-character spans costs the UI thread more than a key press may wait."""
        for name, run in groupby(cells, key=itemgetter(1)):
            characters = "".join(character for character, _name in run)
            text.append(characters, self._style(name) if name else None)

    def _legend(self, capacity_on_scale: bool) -> Text:
        legend = Text(" " * _AXIS_WIDTH)
        legend.append("█", self._style("measured"))
        legend.append(f" {self.measured_label}  ")
        if self.device_field:
            legend.append("•", self._style("device"))
            legend.append(f" {self.device_label}  ")
        if self.predicted_peak:
            legend.append("╌", self._style("predicted"))
            legend.append(f" predicted {format_axis(self.predicted_peak)}  ")
        if self.capacity:
            legend.append("━", self._style("capacity"))
            legend.append(f" capacity {format_axis(self.capacity)}" + ("" if capacity_on_scale else " ↑") + "  ")
        legend.append("F/B/O", self._style("phase"))
        legend.append(" forward/backward/optimizer")
        return legend
