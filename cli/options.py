"""The training flags shared by estimate, trace, run and fit, and their merge into a TrainingConfig.

The flags are the option registry's (memtui.engine.model.options): one per TrainingConfig field.

Precedence: TrainingConfig defaults < --stack < --recipe < --from FILE < flags given on the command line.
Every flag defaults to None so we know which ones the user actually typed.
"""

from __future__ import annotations

import argparse
import sys

from memtui.engine.errors import InputError
from memtui.engine.model.options import MODEL_AND_HARDWARE, OPTIONS, Option
from memtui.engine.model.presets import resolve_recipe
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import config_from_options

_DEFAULTS = TrainingConfig()


def _number(flag: str, kind: type, allowed, rule: str):
    """An argparse type: `kind(text)` for which `allowed(value)` holds, else a one-line error naming the flag."""
    noun = "whole number" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a {noun}") from None
        if not allowed(value):
            raise argparse.ArgumentTypeError(f"{flag}: must be {rule}, got {text}")
        return value

    return parse


def _positive_int(flag: str):
    return _number(flag, int, lambda value: value >= 1, "at least 1")


def _positive_float(flag: str):
    return _number(flag, float, lambda value: value > 0, "more than 0")  # NaN fails too


def _choice(flag: str, choices: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a valid choice (allowed: {', '.join(choices)})")
        return text

    return parse


def _registry_number(option: Option):
    """The option's own number check (the planner's too), as an argparse type."""

    def parse(text: str) -> int | float:
        try:
            return option.parse_number(text)
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_flag(group: argparse._ArgumentGroup, option: Option) -> None:
    default = option.default
    if option.kind == "switch":
        group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{option.help} (default {'on' if default else 'off'})")
    elif option.kind == "select":
        group.add_argument(option.flag, type=_choice(option.flag, option.choices),
                           help=f"{option.help}: {', '.join(option.choices)} (default {default})")
    elif option.kind in ("int", "float"):
        group.add_argument(option.flag, type=_registry_number(option), metavar="N" if option.kind == "int" else "P",
                           help=f"{option.help}; {option.bounds_text()} (default {default})")
    else:
        group.add_argument(option.flag, help=f"{option.help} (default {default})")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per registry entry (memtui.engine.model.options), in its groups; --recipe beside the model."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS.values():
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(option.group.lower())
            if option.group == MODEL_AND_HARDWARE:
                group.add_argument("--recipe", help="apply a named option set first (see `memtui presets`)")
                group.add_argument("--from", dest="from_file", metavar="FILE",
                                   help="read a training config: Hugging Face/TRL (JSON or YAML), torchtune, LitGPT "
                                        "or Axolotl YAML, torchtitan TOML; flags typed beside it override it")
        _add_flag(group, option)


def _answered(note: str, args: argparse.Namespace) -> bool:
    """A "gpus not set: ... give --gpus" note from --from FILE, moot once that flag is typed beside it."""
    field, unset, _ = note.partition(" not set:")
    return bool(unset) and getattr(args, field, None) is not None


def config_from_args(args: argparse.Namespace, **overrides) -> TrainingConfig:
    """Defaults, then the stack's, then the recipe, then --from FILE, then the flags typed, then any overrides.

    What --from FILE could not map is left in `args.from_notes`, --stack's notes in `args.stack_notes` (see
    `file_notes`)."""
    options: dict = {}
    if getattr(args, "recipe", None):
        options.update(resolve_recipe(args.recipe).options)
    if getattr(args, "from_file", None):
        from memtui.engine.model.framework_configs import read_framework_config

        framework = read_framework_config(args.from_file)
        options.update(framework.options)
        args.from_notes = [note for note in framework.notes if not _answered(note, args)]
    for field, option in OPTIONS.items():
        value = getattr(args, field, None)
        if value is not None:
            options[field] = option.from_text(value) if isinstance(value, str) else value
    options.update(overrides)
    if "gpus" not in options and options.get("tp", 1) * options.get("pp", 1) > 1:
        options["gpus"] = options.get("tp", 1) * options.get("pp", 1)  # --tp 8 alone means 8 GPUs
    seq_len_given = "seq_len" in options
    if options.get("stack", "none") != "none":
        # The stack's defaults under everything given (they may depend on it: LoRA, GPUs, sequence).
        from memtui.engine.model.stacks import stack_defaults

        values, args.stack_notes = stack_defaults(options["stack"], options)
        options.update(values)
    if not seq_len_given:
        # A model with learned positions (GPT-2) cannot take the default length (or a stack's); use its own.
        from memtui.engine.model.presets import resolve_model

        spec = resolve_model(options.get("model", _DEFAULTS.model))
        if spec.positions == "learned":
            options["seq_len"] = min(options.get("seq_len", _DEFAULTS.seq_len), spec.max_position_embeddings)
    return config_from_options(options)


def file_notes(args: argparse.Namespace) -> list[str]:
    """The notes --from FILE left (what it mapped from, what it ignored and why), then --stack's (its
    approximations and what it does that memtui does not model yet); empty without either."""
    return [*(getattr(args, "from_notes", None) or []), *(getattr(args, "stack_notes", None) or [])]


def with_file_notes(budget, args: argparse.Namespace):
    """The budget with --from FILE's notes first, as `estimate` and `trace` report them."""
    notes = file_notes(args)
    return budget.model_copy(update={"notes": [*notes, *budget.notes]}) if notes else budget


def print_file_notes(args: argparse.Namespace) -> None:
    """--from FILE's notes on stderr, for the commands whose output has no notes of a budget (fit, run)."""
    for note in file_notes(args):
        print(f"memtui: {note}", file=sys.stderr)


__all__ = ["InputError", "add_training_flags", "config_from_args", "file_notes", "print_file_notes",
           "with_file_notes"]
