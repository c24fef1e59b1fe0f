"""The command palette's presets: every model, GPU and recipe by name; choosing one applies it."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from engine.units import GiB

if TYPE_CHECKING:
    from tui.app import MemtuiApp


def preset_commands() -> list[tuple[str, str, str, str]]:
    """(palette text, kind, preset id, help) for every preset, models first."""
    from engine import presets

    commands = []
    for spec in presets.models().values():
        commands.append((f"Model: {spec.name}", "model", spec.id,
                         f"{spec.id} · {spec.params / 1e9:.2f}B parameters · {spec.num_layers} layers"))
    for gpu in presets.gpus().values():
        commands.append((f"GPU: {gpu.name} ({gpu.memory_bytes / GiB:.2f} GiB)", "gpu", gpu.id,
                         f"{gpu.id} · compute capability {gpu.compute_capability}" + (" · bf16" if gpu.bf16 else "")))
    for recipe in presets.recipes().values():
        commands.append((f"Recipe: {recipe.name}", "recipe", recipe.id, recipe.description))
    return commands


class PresetCommands(Provider):
    """Fuzzy search over presets; 'Model: …', 'GPU: …', 'Recipe: …'."""

    async def startup(self) -> None:
        self._commands = preset_commands()

    def _apply(self, kind: str, preset_id: str) -> None:
        cast("MemtuiApp", self.app).apply_preset(kind, preset_id)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, kind, preset_id, help_text in self._commands:
            score = max(matcher.match(text), matcher.match(f"{text} {preset_id}") * 0.95)
            if score > 0:
                yield Hit(score, matcher.highlight(text), partial(self._apply, kind, preset_id), text=text,
                          help=help_text)

    async def discover(self) -> Hits:
        for text, kind, preset_id, help_text in self._commands:
            yield DiscoveryHit(text, partial(self._apply, kind, preset_id), text=text, help=help_text)
