"""Messages from the live-run thread to the panel: small, and coalesced where they come fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class LiveStreamUpdated(Message):
    """New worker messages are waiting in the controller's buffer.

    Up to 20+ a second: a pending one is replaced by the next, and the handler
    drains the whole buffer, so a slow SSH link gets fewer repaints, never fewer samples.
    """

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LiveStreamUpdated)


@dataclass
class LiveRunEnded(Message):
    """The run is over: its last message (summary, refused or error)."""

    final: dict[str, Any]
