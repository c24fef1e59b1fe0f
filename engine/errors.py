"""One exception type for bad input, so every front end can print one line and exit 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: names the field and, where it can, the allowed values."""

    def __init__(self, field: str, message: str, allowed: str | None = None) -> None:
        self.field = field
        self.message = message
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class PresetError(InputError):
    """A preset file that does not load or validate; the field names the file."""
