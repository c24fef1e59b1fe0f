"""The long explainer for one option (key `?` or F1): what it does, what it costs, when to use it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, Static


class ExplainScreen(ModalScreen[None]):
    """A scrollable Markdown card over the planner; Escape, q or ? closes it."""

    BINDINGS = [
        Binding("escape,q,question_mark,f1", "dismiss_explainer", "Close", tooltip="Back to the planner"),
    ]

    def __init__(self, markdown: str, *, footer: str = "") -> None:
        super().__init__()
        self.markdown = markdown
        self.footer_text = footer

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="explain-card"):
            yield Markdown(self.markdown, id="explain-text")
            if self.footer_text:
                yield Static(self.footer_text, id="explain-footer", markup=False)
            yield Static("Esc closes", id="explain-hint")

    def on_mount(self) -> None:
        self.query_one("#explain-card").focus()

    def action_dismiss_explainer(self) -> None:
        self.dismiss(None)
