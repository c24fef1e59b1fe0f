"""The planner's inputs as data, derived from the option registry (memtui.engine.model.options).

Each TrainingConfig field gets the control its registry kind names, under its
group; the planner adds one input a flag does not have: a config.json path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memtui.engine.model.options import GROUPS as GROUP_TITLES
from memtui.engine.model.options import OPTIONS, Option

Kind = Literal["select", "int", "float", "switch", "text", "model", "gpu", "path"]


@dataclass(frozen=True)
class OptionSpec:
    key: str  # a TrainingConfig field, or "model_path"
    label: str
    kind: Kind
    choices: tuple[str, ...] = ()
    explain_key: str = ""  # explainer to show; defaults to key
    summary_text: str = ""  # one-line description; defaults to the explainer's

    @property
    def summary(self) -> str:
        from memtui.tui.explain import summary

        return self.summary_text or summary(self.explainer)

    @property
    def explainer(self) -> str:
        return self.explain_key or self.key

    @classmethod
    def of(cls, option: Option) -> OptionSpec:
        return cls(option.field, option.label, option.kind, option.choices, explain_key=option.explainer_key)


MODEL_PATH = OptionSpec("model_path", "config.json", "path", explain_key="model",
                        summary_text="Or load your own config.json (Enter).")


def _group(title: str) -> tuple[OptionSpec, ...]:
    specs: list[OptionSpec] = []
    for option in OPTIONS.values():
        if option.group == title:
            specs.append(OptionSpec.of(option))
            if option.field == "model":
                specs.append(MODEL_PATH)  # right under the model picker
    return tuple(specs)


GROUPS: tuple[tuple[str, tuple[OptionSpec, ...]], ...] = tuple((title, _group(title)) for title in GROUP_TITLES)

OPTION_SPECS: dict[str, OptionSpec] = {spec.key: spec for _, specs in GROUPS for spec in specs}

