"""The stacked bar: each component's share of the device peak, against the GPU's capacity."""

from __future__ import annotations

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from memtui.engine.model.specs import COMPONENT_NAMES, Budget
from memtui.engine.units import format_gib, gib_number
from memtui.tui.widgets.component_styles import COMPONENT_STYLES, SHORT_LABELS, glyph, swatch


def segment_widths(values: list[int], scale: float, width: int) -> list[int]:
    """Cells per value so the cells add up to round(sum / scale * width) (largest remainder)."""
    if scale <= 0 or width <= 0:
        return [0] * len(values)
    exact = [max(value, 0) / scale * width for value in values]
    cells = [int(x) for x in exact]
    target = min(width, round(sum(exact)))
    order = sorted(range(len(values)), key=lambda i: exact[i] - cells[i], reverse=True)
    for index in order[: max(target - sum(cells), 0)]:
        cells[index] += 1
    return cells


class MemoryBar(Widget):
    """Three lines: the capacity marker, the stacked bar, and a legend (which wraps when narrow)."""

    DEFAULT_CSS = """
    MemoryBar { height: 4; }
    """

    # The height follows the legend's columns: set only when they change, so most redraws need no layout pass.
    budget: reactive[Budget | None] = reactive(None)

    @staticmethod
    def legend_texts(budget: Budget) -> list[str]:
        """Each component's legend entry after its swatch: 'weights 15.0'."""
        components = budget.per_gpu.model_dump()
        return [f" {SHORT_LABELS[name]} {gib_number(components[name], 1)}" for name in COMPONENT_NAMES]

    @staticmethod
    def legend_columns(width: int, longest: int = 0) -> int:
        """Up to three columns of at least 20 cells, each wide enough for its longest entry (never cut)."""
        return max(1, min(3, width // max(20, longest + 2)))  # + the swatch and a space between columns

    def _columns(self, width: int) -> int:
        longest = max(map(len, self.legend_texts(self.budget))) if self.budget is not None else 0
        return self.legend_columns(width, longest)

    def _fit_height(self) -> None:
        width = self.content_region.width
        if width:
            height = 2 + -(-len(COMPONENT_NAMES) // self._columns(width))
            if self.styles.height is None or self.styles.height.value != height:
                self.styles.height = height

    def on_resize(self) -> None:
        self._fit_height()

    def watch_budget(self) -> None:
        self._fit_height()

    def render(self) -> Content:
        budget = self.budget
        if budget is None:
            return Content("")
        no_color = self.app.no_color
        width = max(self.content_region.width or self.size.width, 10)
        capacity = budget.gpu.memory_bytes
        peak = budget.device_peak_bytes
        scale = max(capacity, peak)
        components = budget.per_gpu.model_dump()
        values = [components[name] for name in COMPONENT_NAMES]
        cells = segment_widths(values, scale, width)
        capacity_column = min(max(round(capacity / scale * width) - 1, 0), width - 1)

        # Line 1: where the card ends.
        over = peak > capacity
        marker_text = f"GPU {format_gib(capacity)} ▼"
        start = max(capacity_column - len(marker_text) + 1, 0)
        marker_style = "bold $error" if over else "bold $text"
        top = Content.assemble(" " * start, (marker_text, marker_style))

        # Line 2: the segments, free space, and the capacity line drawn over them.
        bar_cells: list[tuple[str, str]] = []
        for name, count in zip(COMPONENT_NAMES, cells):
            bar_cells += [(glyph(name, no_color), COMPONENT_STYLES[name])] * count
        free_glyph = "·" if no_color else "░"
        bar_cells += [(free_glyph, "$foreground-darken-3")] * (width - len(bar_cells))
        character, _ = bar_cells[capacity_column]
        if over:
            bar_cells[capacity_column] = ("┃", "bold $error")
        else:
            bar_cells[capacity_column] = ("▕" if character == free_glyph else "┃", "bold $text")
        bar = Content.assemble(*bar_cells)

        # Then the legend, GiB per component, in columns; the column count depends on the width only.
        columns = self._columns(width)
        column_width = width // columns
        entries = [
            Content.assemble(swatch(name, no_color), text).truncate(column_width - 1, pad=True)
            for name, text in zip(COMPONENT_NAMES, self.legend_texts(budget))
        ]
        legend_lines = [
            Content.assemble(*entries[start : start + columns]) for start in range(0, len(entries), columns)
        ]
        return Content("\n").join([top, bar, *legend_lines])
