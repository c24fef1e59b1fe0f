"""--pp: every pipeline rank's budget (the estimate's `stages`), the binding rank marked; hidden without PP."""

from __future__ import annotations

from dataclasses import dataclass

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from memtui.engine.model.specs import Budget, StageBudget
from memtui.engine.units import gib_number
from memtui.tui.widgets.budget import column_width

BINDING_MARK = " ◀"


@dataclass(frozen=True)
class Column:
    long: str  # the heading where the row fits with it
    short: str  # the heading on narrow screens
    cells: list[str]
    numeric: bool = True  # right-aligned figures
    least: int = 6  # figures up to 99.99 GiB keep a space before them

    def width(self, heading: str) -> int:
        if self.numeric:
            return column_width([*self.cells, heading], self.least)
        return max(map(len, [*self.cells, heading])) + 1

    def cell(self, text: str, width: int) -> str:
        return text.rjust(width) if self.numeric else text.ljust(width)


def first_fitting(width: int, *texts: str) -> str:
    """The first (longest) wording that fits in `width` cells, else the last."""
    return next((text for text in texts if len(text) <= width), texts[-1])


def binding_stage(budget: Budget) -> StageBudget:
    """The rank the budget is: the largest tensor peak, the first of equals (memtui.engine.estimator's rule)."""
    return max(budget.stages, key=lambda stage: stage.tensor_peak_bytes)


class StageTable(Widget):
    """One row per pipeline rank: its stages and layers, what it holds at its own tensor peak, and that peak.

    The budget above (verdict, bar, component table) is the binding rank's; no other needs more.
    """

    DEFAULT_CSS = """
    StageTable { height: auto; }
    """

    budget: reactive[Budget | None] = reactive(None, layout=True)  # the rank count sets the height

    def show(self, budget: Budget | None) -> None:
        self.display = budget is not None and bool(budget.stages)
        self.budget = budget

    @staticmethod
    def columns(budget: Budget, *, roles: bool, ranks: bool) -> list[Column]:
        """`roles`: each rank's embedding/head beside it; `ranks`: a rank column beside the stages under
        interleaving (without it the rows, in rank order, name their ranks)."""
        stages = budget.stages

        def with_role(stage: StageBudget, text: str) -> str:
            return f"{text} {stage.role}".rstrip() if roles else text

        indices = [",".join(map(str, stage.stages)) for stage in stages]
        interleaved = any(len(stage.stages) > 1 for stage in stages)  # a rank runs several stages
        if interleaved and ranks:
            first = [Column("rank", "rank", [with_role(stage, str(stage.rank)) for stage in stages], numeric=False),
                     Column("stages", "stages", indices, numeric=False)]
        else:
            heading = "stages" if interleaved else "stage"
            first = [Column(heading, heading, [with_role(stage, text) for stage, text in zip(stages, indices)],
                            numeric=False)]
        figures = [Column(long, short, [gib_number(getattr(stage.per_gpu, name)) for stage in stages])
                   for name, long, short in (("weights", "weights", "wts"), ("gradients", "grads", "grads"),
                                             ("optimizer_states", "optimizer", "optim"),
                                             ("activations", "activations", "act"))]
        return [*first, Column("layers", "L", [str(stage.layers) for stage in stages], least=3), *figures,
                Column("peak", "peak", [gib_number(stage.tensor_peak_bytes) for stage in stages])]

    def render(self) -> Content:
        budget = self.budget
        if budget is None or not budget.stages:
            return Content("")
        width = max(self.content_region.width, 20)
        # The widest form that fits: full headings with each rank's embedding/head, then short headings, then
        # without the roles, then (interleaved) the stages alone.
        for long, roles, ranks in ((True, True, True), (False, True, True), (False, False, True),
                                   (False, False, False)):
            columns = self.columns(budget, roles=roles, ranks=ranks)
            headings = [column.long if long else column.short for column in columns]
            widths = [column.width(heading) for column, heading in zip(columns, headings)]
            if sum(widths) + len(BINDING_MARK) <= width:
                break
        config = budget.config
        title = "Pipeline ranks at their tensor peaks, GiB"
        title = first_fitting(width, f"{title} · {config.get('pp_schedule')}, {config.get('microbatches')} "
                                     "micro-batches", f"{title} · {config.get('pp_schedule')}", title)
        lines = [Content.styled(title, "bold").truncate(width, ellipsis=True)]
        lines.append(Content.styled("".join(column.cell(heading, cell_width) for column, heading, cell_width
                                            in zip(columns, headings, widths)), "bold").truncate(width))
        binding = binding_stage(budget)
        for index, stage in enumerate(budget.stages):
            cells = "".join(column.cell(column.cells[index], cell_width) for column, cell_width in zip(columns, widths))
            if stage is binding:
                row = Content.assemble((cells, "bold"), (BINDING_MARK, "bold $text-warning"))
            else:
                row = Content(cells)
            lines.append(row.truncate(width))
        mark = BINDING_MARK.strip()
        footnote = first_fitting(width, f"{mark} binding: the budget above is this rank's, the largest peak",
                                 f"{mark} the budget above is this rank's")
        lines.append(Content.styled(footnote, "$text-muted").truncate(width, ellipsis=True))
        return Content("\n").join(lines)
