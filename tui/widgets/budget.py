"""The budget's read-outs: verdict banner, fit hint, component table (with deltas against a pin), step timeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work
from textual.containers import VerticalScroll
from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from memtui.engine.model.options import label
from memtui.engine.model.specs import COMPONENT_NAMES, Budget
from memtui.engine.units import format_count, format_gib, gib_number
from memtui.tui.planner import PlanResult, config_differences
from memtui.tui.widgets.component_styles import COMPONENT_LABELS, swatch
from memtui.tui.widgets.text import Text

if TYPE_CHECKING:
    from memtui.engine.planning.fit import Suggestion


def column_width(texts: list[str], least: int) -> int:
    """Cells for a right-aligned column of figures: the widest and a space before it, at least `least`."""
    return max(least, max(map(len, texts), default=0) + 1)


OVER_GLYPH = "▒"  # the part of a bar beyond the GPU's capacity, under NO_COLOR (where red is not seen)


def capacity_bar(value: int, capacity: int, largest: int, width: int, no_color: bool, *, free: str, line: str,
                 line_style: str = "$text-muted") -> list[tuple[str, str]]:
    """A one-quantity bar against the GPU's capacity (a line at its column); what lies beyond it is red, or
    patterned under NO_COLOR. `largest` is the biggest value among the bars it is drawn beside."""
    if width <= 0:
        return []
    scale = max(capacity, largest, 1)
    filled = min(round(value / scale * width), width)
    capacity_column = min(max(round(capacity / scale * width) - 1, 0), width - 1)
    over_glyph = OVER_GLYPH if no_color else "█"
    cells = [("█", "$primary") if column <= capacity_column else (over_glyph, "$error")
             for column in range(filled)]
    cells += [(free, "$foreground-darken-3")] * (width - filled)
    cells[capacity_column] = (line, "bold $error" if value > capacity else line_style)
    return cells


def fit_words(budget: Budget) -> str:
    return "fits" if budget.fits else "does not fit"


class VerdictBanner(Widget):
    """FITS / DOES NOT FIT with the headroom, in the colour of the verdict; shorter when narrow."""

    DEFAULT_CSS = """
    VerdictBanner { height: 1; }
    """

    result: reactive[PlanResult | None] = reactive(None)

    def show(self, result: PlanResult) -> None:
        fits = result.budget is not None and result.budget.fits
        self.set_class(result.stale, "-stale")
        self.set_class(result.budget is not None and fits, "-fits")
        self.set_class(result.budget is not None and not fits, "-over")
        self.result = result

    def render(self) -> Content:
        result = self.result
        if result is None:
            return Content("")
        budget = result.budget
        if budget is None:
            return Content("No valid budget yet: fix the highlighted input.")
        capacity = budget.gpu.memory_bytes
        share = 100 * budget.device_peak_bytes / capacity
        prefix = "STALE " if result.stale else ""
        if budget.fits:
            label, short = "✔ FITS", f"  headroom {gib_number(budget.headroom_bytes)} GiB"
            detail = f"  {gib_number(budget.device_peak_bytes)} of {gib_number(capacity)} GiB ({share:.0f}%) ·" + short[1:]
        else:
            label, short = "✘ DOES NOT FIT", f"  over by {gib_number(-budget.headroom_bytes)} GiB"
            detail = f"  needs {gib_number(budget.device_peak_bytes)} of {gib_number(capacity)} GiB ·" + short[1:]
        # One line always: the long form where it fits, else the headroom alone (the bar shows the rest).
        width = self.content_region.width
        text = detail if len(prefix + label + detail) <= width else short
        verdict = Content.assemble((label, "bold"), text)
        if result.stale:
            verdict = Content.assemble(("STALE ", "bold"), verdict)
        return verdict


class ErrorLine(Text):
    """Why the budget is stale, next to the banner (the field itself shows it too)."""

    def show(self, result: PlanResult) -> None:
        self.display = result.error is not None
        if result.error is not None:
            self.set(Content.assemble(("⚠ ", "bold"), result.error.describe(label), " — showing the last valid budget"))

    def show_derivation(self, model: str, stage: str, fraction: float) -> None:
        """A generic model's layers being traced for the options just set (a subprocess: seconds)."""
        self.display = True
        self.set(Content.assemble(("⏳ ", "bold"), f"Tracing {model}'s layers for these options, once: {stage} "
                                  f"({100 * fraction:.0f}%) — showing the last valid budget"))


class SummaryLine(Text):
    """Model, parameters, GPU and workload in one line."""

    def show(self, result: PlanResult) -> None:
        budget, config, model, gpu = result.budget, result.config, result.model, result.gpu
        if budget is None or config is None:
            self.set("")
            return
        model_name = model.name if model else budget.model.id
        gpu_name = gpu.name if gpu else budget.gpu.id
        trainable = budget.model.trainable_params
        trained = "all trainable" if trainable == budget.model.params else f"{format_count(trainable)} trainable"
        self.set(
            Content.assemble(
                (model_name, "bold"),
                f" · {format_count(budget.model.params)} params, {trained} · ",
                (f"{config.gpus}x {gpu_name}", "bold"),
                f" · batch {config.batch_size} x {config.seq_len} tokens",
            )
        )


class ComponentTable(Widget):
    """GiB and % per component at the peak; a delta column against the pin when one is set. The reserved
    peak and the fragmentation come from replaying the step through the caching-allocator model, in a worker:
    the first replay of a large model takes up to about a second, so the budget is drawn first and the replay's
    rows follow. The verdict, the bar and "To fit" keep the estimate's device peak (published allocator slack),
    as fit and the ladder do; the replay's device peak is its own row."""

    DEFAULT_CSS = """
    ComponentTable { height: 14; }
    """

    # Fixed height (heading, six components, a rule, six totals): redraw without a layout pass.
    result: reactive[PlanResult | None] = reactive(None)
    pinned: reactive[PlanResult | None] = reactive(None)
    # The budget with the allocator replayed (reserved_peak_bytes None: it cannot be, a note says why).
    replayed: reactive[Budget | None] = reactive(None)

    REPLAY_DELAY_S = 0.25  # typing changes the options key by key: replay the one the user stops at

    def watch_result(self, result: PlanResult | None) -> None:
        if result is None or result.budget is None or result.config is None or result.gpu is None \
                or result.model is None:
            return
        replayed = self.replayed
        if replayed is not None and replayed.config == result.budget.config and replayed.gpu == result.budget.gpu:
            return
        self.replayed = None
        timer = getattr(self, "_replay_timer", None)
        if timer is not None:
            timer.stop()
        from memtui.engine.estimator.reserved import with_reserved_if_replayed

        at_once = with_reserved_if_replayed(result.budget, result.config, result.model, result.gpu)
        if at_once is not None:  # cached, or a step it cannot replay: no replay to run
            self.replayed = at_once
            return
        self._replay_timer = self.set_timer(self.REPLAY_DELAY_S, lambda: self.replay_allocator(result))

    @work(thread=True, exclusive=True, exit_on_error=False, group="allocator-replay")
    def replay_allocator(self, result: PlanResult) -> None:
        """The replay is cached per option set: going back to a configuration shows it at once."""
        from memtui.engine.estimator.reserved import with_reserved

        replayed = with_reserved(result.budget, result.config, result.model, result.gpu)
        self.app.call_from_thread(self._show_replayed, result, replayed)

    def _show_replayed(self, result: PlanResult, replayed: Budget) -> None:
        current = self.result
        if current is not None and current.budget is not None and current.budget.config == replayed.config \
                and current.budget.gpu == replayed.gpu:
            self.replayed = replayed

    def watch_pinned(self, pinned: PlanResult | None) -> None:
        self.set_class(pinned is not None, "-pinned")  # wider, for the delta column (app.tcss)

    def render(self) -> Content:
        result = self.result
        if result is None or result.budget is None:
            return Content("")
        budget = result.budget
        pinned = self.pinned.budget if self.pinned is not None else None
        no_color = self.app.no_color
        width = max(self.content_region.width, 30)
        # Figures keep a space before them however wide they grow (up to "−1,000,000"); the names give way.
        number_width = column_width([gib_number(value) for value in budget.per_gpu.model_dump().values()]
                                    + [gib_number(budget.device_peak_bytes)], 8)
        percent_width = 6
        delta_width = 0
        if pinned is not None:
            changes = [now - then for now, then in zip(budget.per_gpu.model_dump().values(),
                                                       pinned.per_gpu.model_dump().values())]
            changes += [budget.device_peak_bytes - pinned.device_peak_bytes,
                        budget.tensor_peak_bytes - pinned.tensor_peak_bytes]
            delta_width = column_width([gib_number(change, signed=True) for change in changes], 9)
        name_width = max(width - 2 - number_width - percent_width - delta_width, 10)
        total = max(budget.device_peak_bytes, 1)
        components = budget.per_gpu.model_dump()
        before = pinned.per_gpu.model_dump() if pinned is not None else {}

        def row(label: Content | str, value: str, percent: str, delta: Content | str = "", style: str = "") -> Content:
            cells = [
                label if isinstance(label, Content) else Content.styled(label, style),
                Content(value.rjust(number_width)),
                Content(percent.rjust(percent_width)),
            ]
            if pinned is not None:
                delta_content = delta if isinstance(delta, Content) else Content(delta)
                cells.append(delta_content.right(delta_width))
            return Content.assemble(*cells)

        def delta_cell(now: int, then: int) -> Content:
            change = now - then
            style = "$text-success" if change < 0 else "$text-error" if change > 0 else "$text-muted"
            return Content.styled(gib_number(change, signed=True), style)

        heading = f"At the {budget.peak_phase} peak"
        lines = [
            row(Content.styled(heading[: name_width + 2].ljust(name_width + 2), "bold"), "GiB", "%",
                "Δ pin" if pinned is not None else "", style="bold").stylize("bold"),
        ]
        for name in COMPONENT_NAMES:
            value = components[name]
            label = Content.assemble(swatch(name, no_color), " ", COMPONENT_LABELS[name][:name_width].ljust(name_width))
            lines.append(
                row(label, gib_number(value), f"{100 * value / total:.1f}",
                    delta_cell(value, before[name]) if pinned is not None else "")
            )
        lines.append(Content.styled("─" * width, "$foreground-darken-3"))
        peak_label = "Device peak (NVML)"[: name_width + 2].ljust(name_width + 2)
        lines.append(
            row(Content.styled(peak_label, "bold"), gib_number(budget.device_peak_bytes), "100.0",
                delta_cell(budget.device_peak_bytes, pinned.device_peak_bytes) if pinned is not None else "")
        )
        tensor_label = "Tensor peak (PyTorch)"[: name_width + 2].ljust(name_width + 2)
        lines.append(
            row(tensor_label, gib_number(budget.tensor_peak_bytes), f"{100 * budget.tensor_peak_bytes / total:.1f}",
                delta_cell(budget.tensor_peak_bytes, pinned.tensor_peak_bytes) if pinned is not None else "")
        )
        # Figures outside the tensor peak, shown only when this configuration (or the pinned one) has them.
        for name, figure in (("Paged (unified memory)", "paged_bytes"), ("  paged out to host", "paged_evicted_bytes"),
                             ("Offloaded to CPU (pinned)", "offloaded_activation_bytes")):
            now, then = getattr(budget, figure), getattr(pinned, figure) if pinned is not None else 0
            if now or then:
                lines.append(row(name[: name_width + 2].ljust(name_width + 2), gib_number(now),
                                 f"{100 * now / total:.1f}", delta_cell(now, then) if pinned is not None else ""))
        replayed = self.replayed
        pending = "…" if replayed is None else "n/a"  # replaying, or a step it cannot replay (see the notes)
        if replayed is not None and replayed.reserved_peak_bytes is None:
            replayed = None

        def replay_row(text: str, value: int | None) -> Content:
            return row(text[: name_width + 2].ljust(name_width + 2), gib_number(value) if value is not None else pending,
                       f"{100 * value / total:.1f}" if value is not None else "")

        lines.append(replay_row("Reserved (allocator)", replayed.reserved_peak_bytes if replayed else None))
        lines.append(replay_row("  of it fragmentation", replayed.fragmentation_bytes if replayed else None))
        lines.append(replay_row("Device peak, replayed", replayed.replayed_device_peak_bytes if replayed else None))
        states_label = "Bytes per parameter"[: name_width + 2].ljust(name_width + 2)
        bpp_delta: Content | str = ""
        if pinned is not None:
            change = budget.bytes_per_param - pinned.bytes_per_param
            style = "$text-success" if change < 0 else "$text-error" if change > 0 else "$text-muted"
            bpp_delta = Content.styled(f"{change:+.2f}" if abs(change) >= 0.005 else "0.00", style)
        lines.append(row(states_label, f"{budget.bytes_per_param:.2f}", "", bpp_delta))
        return Content("\n").join(lines)


class TimelineChart(Widget):
    """Memory through one step (start, forward, loss, backward, optimizer, end), as horizontal bars."""

    DEFAULT_CSS = """
    TimelineChart { height: 7; }
    """

    budget: reactive[Budget | None] = reactive(None)

    def render(self) -> Content:
        budget = self.budget
        if budget is None:
            return Content("")
        width = max(self.content_region.width, 1)
        label_width = 10
        value_width = column_width([gib_number(point.bytes) for point in budget.timeline], 7)
        marker_width = 2  # " ◀" on the peak
        bar_width = width - label_width - value_width - marker_width
        if bar_width < 3:  # too narrow for a bar: the figures alone, never a wrapped line
            bar_width = 0
        capacity = budget.gpu.memory_bytes
        peak_value = max(point.bytes for point in budget.timeline)
        lines = [Content.styled("Through one step, GiB", "bold").truncate(width)]
        for point in budget.timeline:
            is_peak = point.bytes == peak_value and point.phase == budget.peak_phase
            lines.append(
                Content.assemble(
                    point.phase[:label_width].ljust(label_width),
                    *capacity_bar(point.bytes, capacity, peak_value, bar_width, self.app.no_color, free=" ",
                                  line="┊"),
                    gib_number(point.bytes).rjust(value_width),
                    (" ◀" if is_peak else "", "bold $text-warning"),
                ).truncate(width)
            )
        return Content("\n").join(lines)


class PinSummary(Text):
    """What the pin was and what changed since: the compare view's headline."""

    def show(self, result: PlanResult, pinned: PlanResult | None) -> None:
        self.display = pinned is not None and pinned.budget is not None
        if pinned is None or pinned.budget is None or result.budget is None:
            return
        then, now = pinned.budget, result.budget
        change = now.device_peak_bytes - then.device_peak_bytes
        style = "$text-success" if change < 0 else "$text-error" if change > 0 else "$text-muted"
        # Both values, then the change: a bare delta after "now" read as the current peak.
        parts: list[Content | str | tuple[str, str]] = [
            ("Pinned: ", "bold"),
            f"{format_gib(then.device_peak_bytes)} ({fit_words(then)}) → ",
            ("now: ", "bold"),
            f"{format_gib(now.device_peak_bytes)} ({fit_words(now)}), ",
            (f"{format_gib(change, signed=True)}", f"bold {style}"),
        ]
        if pinned.config is not None and result.config is not None:
            differences = config_differences(pinned.config, result.config)
            if differences:
                changed = ", ".join(f"{key} {before}→{after}" for key, before, after in differences)
                parts.append(f" · changed: {changed}")
            else:
                parts.append(" · same options")
        self.set(Content.assemble(*parts))


class FitHint(Text):
    """Under a "does not fit" verdict: the least invasive change that fits (memtui.engine.planning.fit.suggest), and `f` applies it.

    The search takes up to a fraction of a second, so it runs in a worker; until its answer for the current
    options arrives, the previous hint stays, dimmed.
    """

    def show(self, suggestion: Suggestion | None, *, pending: bool = False) -> None:
        self.set_class(pending, "-pending")
        if suggestion is None or suggestion.fits_already:
            self.display = False
            return
        self.display = True
        plan = suggestion.plan
        if plan is None:
            self.set(Content.assemble(("To fit: ", "bold"), suggestion.message.removeprefix("nothing fits: ").join(
                ("nothing memtui tries fits (", ")"))))
            return
        self.set(
            Content.assemble(
                ("To fit: ", "bold"),
                plan.summary,
                f" → {gib_number(plan.budget.device_peak_bytes)} GiB",
                ("  f applies", "bold $text-accent"),
            )
        )


WIDE_FROM = 110  # terminal columns from which the planner uses its wide layout (the app's breakpoint)


class BudgetScroll(VerticalScroll):
    """The budget's details, scrolling under the verdict and the bar.

    Wide, the table and the timeline come first, then the savings ladder. Narrow (80x24), the ladder moves
    up, right under the summary: it is what moves as options change, while the bar's legend above already
    gives each component's GiB.
    """

    def on_resize(self) -> None:
        self.arrange_for(self.app.size.width)

    def arrange_for(self, width: int) -> None:
        ladders, details = self.query("#ladder"), self.query("#details")
        if not ladders or not details:
            return
        ladder, table = ladders.first(), details.first()
        ladder_first = self.children.index(ladder) < self.children.index(table)
        if width < WIDE_FROM and not ladder_first:
            self.move_child(ladder, before=table)
        elif width >= WIDE_FROM and ladder_first:
            self.move_child(ladder, after=table)
