"""A Static that only redraws when its content really changed.

Every edit recomputes the whole budget; most read-outs come back identical,
and a needless update costs a layout pass over the whole screen.
"""

from __future__ import annotations

from textual.visual import VisualType
from textual.widgets import Static


class Text(Static):
    """Static with `set()`: no-op when unchanged; `layout=False` when the size cannot change."""

    _shown: object = None

    def set(self, content: VisualType, *, layout: bool = True) -> None:
        if content == self._shown:
            return
        self._shown = content
        self.update(content, layout=layout)
