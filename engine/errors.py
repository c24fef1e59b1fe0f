"""One exception type for bad input, so every front end can print one line and exit 2."""

from __future__ import annotations

import re
from collections.abc import Callable

# "{lora_rank}" in a message stands for that option's name in the reader's front end.
_FIELD_REFERENCE = re.compile(r"\{([a-z][a-z0-9_]*)\}")


def cli_flag(field: str) -> str:
    """The command line's name for a field: 'lora_rank' -> '--lora-rank'; anything else (a path, an
    environment variable such as MEMTUI_EXPORT_DIR) as is."""
    return "--" + field.replace("_", "-") if field.isidentifier() and field.islower() else field


class InputError(ValueError):
    """Bad user input: names the field and, where it can, the allowed values.

    `field` is a TrainingConfig field ("lora_rank") or, for input that is not one,
    the flag or file it came from ("--device", "/x/config.json: hidden_size").
    `fields` are every option the refusal involves, `field` first. `message` and
    `allowed` may refer to options as "{field}"; `describe` names them the way
    its front end does (str() names them as the command line does).
    """

    def __init__(self, field: str, message: str, allowed: str | None = None,
                 *, fields: tuple[str, ...] = ()) -> None:
        self.field = field
        self.fields = (field, *(name for name in fields if name != field))
        self.message = message
        self.allowed = allowed
        super().__init__(self.describe(cli_flag))

    def reason(self, name: Callable[[str], str]) -> str:
        """The message and the allowed values, options named by `name`."""
        text = _FIELD_REFERENCE.sub(lambda match: name(match.group(1)), self.message)
        if self.allowed:
            text += " (allowed: " + _FIELD_REFERENCE.sub(lambda match: name(match.group(1)), self.allowed) + ")"
        return text

    def describe(self, name: Callable[[str], str]) -> str:
        """One line: the field and the reason, options named by `name`."""
        return f"{name(self.field)}: {self.reason(name)}"

    def __str__(self) -> str:
        return self.describe(cli_flag)


class DerivationNeeded(InputError):
    """A generic model's step is not derived yet for these options: a front end traces it once (torch, seconds),
    then asks again."""


class PresetError(InputError):
    """A preset file that does not load or validate; the field names the file."""
