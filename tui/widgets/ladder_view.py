"""The savings ladder on screen: one row per optimization, what it removed, and why (for the highlighted row)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.events import Resize
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from memtui.engine.model.specs import COMPONENT_NAMES
from memtui.engine.units import GiB, gib_number
from memtui.tui.widgets.budget import capacity_bar, column_width
from memtui.tui.widgets.component_styles import SHORT_LABELS
from memtui.tui.widgets.text import Text

if TYPE_CHECKING:  # the ladder module loads with the first ladder, after the first frame
    from memtui.engine.planning.ladder import LadderStep, SavingsLadder

STEP_EXPLAINERS = {"baseline": "optimizer_states"}  # what to explain for the baseline row
# Options that belong to another option's rung.
RUNG_OF = {"master_weights": "precision", "lora_targets": "lora_rank", "galore_rank": "optimizer"}


def short_label(step: LadderStep) -> str:
    """A few words for a rung, for narrow screens: "LoRA r16", "nf4", "ZeRO-3", "full ckpt"."""
    if step.is_baseline:
        return "baseline"
    config = step.config
    words = {
        "precision": config.precision if not config.master_weights
        else ("bf16" if config.precision.startswith("bf16") else "fp16") + " +fp32",
        "optimizer": {"galore-adamw": f"GaLore r{config.galore_rank}", "sgd-momentum": "SGD mom."}.get(
            config.optimizer, config.optimizer),
        "optimizer_impl": "fused step" if config.optimizer_impl == "fused" else config.optimizer_impl,
        "lora_rank": f"LoRA r{config.lora_rank}",
        "quant": config.quant,
        "tp": f"TP {config.tp}",
        "pp": f"PP {config.pp}",
        "zero": f"ZeRO-{config.zero}",
        "offload": "CPU offload",
        "attention": "flash attn",
        "checkpointing": {"selective": "sel. ckpt", "selective-op": "sel. op ckpt"}.get(
            config.checkpointing, f"{config.checkpointing} ckpt"),
    }
    return " + ".join(words.get(key, key) for key in step.keys)


def step_explainer_key(step: LadderStep) -> str:
    """The option whose explainer tells why this rung helped (the first one applied)."""
    key = step.keys[0]
    return STEP_EXPLAINERS.get(key, key)


class LadderView(Vertical):
    """Title, column headings, the rungs (keyboard and mouse navigable), and the highlighted rung's story."""

    DEFAULT_CSS = """
    LadderView { height: auto; }
    LadderView > OptionList { height: auto; max-height: 14; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.ladder: SavingsLadder | None = None
        self.pending = False  # the budget shows another configuration; this ladder's replacement is being built
        self.stale = False  # an input is refused: this is the last valid configuration's ladder
        self._prompts: list[Content] = []

    def compose(self) -> ComposeResult:
        yield Text("", id="ladder-title", classes="section-title")
        yield Text("", id="ladder-head", classes="ladder-head")
        yield OptionList(id="ladder-list")
        yield Text("", id="ladder-why", classes="ladder-why")

    @property
    def option_list(self) -> OptionList:
        return self.query_one("#ladder-list", OptionList)

    def highlighted_step(self) -> LadderStep | None:
        index = self.option_list.highlighted
        if self.ladder is None or index is None or not 0 <= index < len(self.ladder.steps):
            return None
        return self.ladder.steps[index]

    def show(self, ladder: SavingsLadder | None, *, changed_key: str | None = None, stale: bool = False) -> None:
        """Draw `ladder`; highlight the step of the option just changed, so its 'why' shows at once.

        `stale`: it is the last valid configuration's, shown while an input is refused (as the budget is).
        """
        if not self.query("#ladder-list"):
            return  # the app is closing: its children went while a worker's ladder was on its way
        self.ladder = ladder
        self.pending = False
        self.stale = stale
        self.set_class(False, "-pending")
        self._rebuild()
        if ladder is not None and changed_key is not None:
            rung = RUNG_OF.get(changed_key, changed_key)
            for index, step in enumerate(ladder.steps):
                if rung in step.keys:
                    self.option_list.highlighted = index
                    break

    def mark_pending(self, *, stale: bool = False) -> None:
        """The budget moved on to a configuration whose ladder is being built: say so over the old rows."""
        self.pending = True
        self.stale = stale
        self.set_class(True, "-pending")
        self._show_title()

    def _show_title(self) -> None:
        title = self.query_one("#ladder-title", Text)
        ladder = self.ladder
        marks: list[tuple[str, str]] = [("STALE ", "bold $text-warning")] if self.stale else []
        if ladder is None:
            title.set(Content.assemble(*marks, ("Savings ladder", "bold")))
            return
        if self.pending:
            title.set(Content.assemble(*marks, ("Savings ladder", "bold"),
                                       ("  updating for the current options…", "$text-warning")))
            return
        baseline, final = ladder.baseline.budget, ladder.final.budget
        title.set(
            Content.assemble(
                *marks,
                ("Savings ladder", "bold"),
                f"  {baseline.bytes_per_param:.0f} → {final.bytes_per_param:.2f} bytes/param, "
                f"device peak {gib_number(baseline.device_peak_bytes, 1)} → {gib_number(final.device_peak_bytes, 1)} GiB",
            )
        )

    def _on_resize(self, event: Resize) -> None:
        self._rebuild()

    def _columns(self, width: int, removed_width: int = 9, peak_width: int = 9) -> tuple[int, int]:
        """(label width, mini-bar width) for this width: the bar goes first when space is short."""
        numbers = removed_width + peak_width + 6 + 5  # removes, peak, B/param, fits
        longest = 48  # labels longer than this are rare; wide screens give the rest to the bar
        shortest = max(12 - (removed_width + peak_width - 18), 6)  # figures wider than usual come out of the label
        bar = max(12, min(40, width - numbers - longest - 3)) if width >= 70 else 0
        label = min(max(width - numbers - (bar + 1 if bar else 0) - 2, shortest), longest)
        return label, bar

    def _rebuild(self) -> None:
        option_list = self.option_list
        ladder = self.ladder
        head = self.query_one("#ladder-head", Text)
        self._show_title()
        if ladder is None:
            head.set("")
            option_list.clear_options()
            self._prompts = []
            return
        final = ladder.final.budget
        width = max(option_list.content_region.width or self.content_region.width or 60, 40)
        # Figures keep a space before them however wide they grow (up to "−1,000,000"); the labels give way.
        removed_width = column_width([gib_number(-step.removed_total, 1, signed=True) for step in ladder.steps], 9)
        peak_width = column_width([gib_number(step.budget.device_peak_bytes, 1) for step in ladder.steps], 9)
        label_width, bar_width = self._columns(width, removed_width, peak_width)
        heading = "step".ljust(label_width) + "Δ GiB".rjust(removed_width)
        if bar_width:
            heading += " " + "peak vs GPU".ljust(bar_width)
        heading += "peak".rjust(peak_width) + "B/par".rjust(6) + "fits".rjust(5)
        head.set(Content.styled(heading, "$text-muted"), layout=False)
        capacity = final.gpu.memory_bytes
        scale = max(capacity, *(step.budget.device_peak_bytes for step in ladder.steps))
        highlighted = option_list.highlighted
        keep_highlight = option_list.option_count == len(ladder.steps)
        prompts = [self._row(step, (label_width, removed_width, bar_width, peak_width), scale, capacity)
                   for step in ladder.steps]
        if prompts != self._prompts:
            self._prompts = prompts
            option_list.set_options(Option(prompt, id=f"step-{index}") for index, prompt in enumerate(prompts))
            if highlighted is None or not keep_highlight:
                highlighted = len(prompts) - 1  # a different ladder: start from the result
            option_list.highlighted = highlighted
        self._show_why()

    def _row(self, step: LadderStep, widths: tuple[int, int, int, int], scale: int, capacity: int) -> Content:
        label_width, removed_width, bar_width, peak_width = widths
        budget = step.budget
        label = step.label if len(step.label) <= label_width else short_label(step)
        if len(label) > label_width:
            label = label[: label_width - 1] + "…"
        if step.is_baseline:
            removed = Content("".rjust(removed_width))
        else:
            change = -step.removed_total
            style = "$text-success" if change < 0 else "$text-error" if change > 0 else "$text-muted"
            removed = Content.styled(gib_number(change, 1, signed=True), style).right(removed_width)
        parts: list[Content | str | tuple[str, str]] = [label.ljust(label_width), removed]
        if bar_width:
            parts += [" ", *capacity_bar(budget.device_peak_bytes, capacity, scale, bar_width, self.app.no_color,
                                         free="·", line="┃", line_style="$text")]
        parts += [
            gib_number(budget.device_peak_bytes, 1).rjust(peak_width),
            f"{budget.bytes_per_param:.2f}".rjust(6),
            ("  ✔  " if budget.fits else "  ✘  ", "$text-success" if budget.fits else "$text-error"),
        ]
        return Content.assemble(*parts)

    @on(OptionList.OptionHighlighted, "#ladder-list")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        self._show_why()

    def _show_why(self) -> None:
        from memtui.tui.explain import summary  # the explainers' text loads with the first ladder

        why = self.query_one("#ladder-why", Text)
        step = self.highlighted_step()
        if step is None:
            why.set("")
            return
        if step.is_baseline:
            why.set(
                Content.assemble(
                    ("Baseline: ", "bold"),
                    "fp32 weights + fp32 gradients + two fp32 AdamW moments = 16 bytes per parameter, "
                    "before activations. ",
                    ("? explains", "$text-muted"),
                )
            )
            return
        removed = sorted(
            ((name, step.removed[name]) for name in COMPONENT_NAMES if abs(step.removed[name]) >= GiB // 100),
            key=lambda item: -abs(item[1]),
        )
        changes = ", ".join(f"{SHORT_LABELS[name]} {gib_number(-value, 1, signed=True)}" for name, value in removed[:4])
        why.set(
            Content.assemble(
                (f"{step.label}: ", "bold"),
                summary(step_explainer_key(step)),
                f" At the peak: {changes} GiB. " if changes else " No change at the peak. ",
                ("? explains", "$text-muted"),
            )
        )
