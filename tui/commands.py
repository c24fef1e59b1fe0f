"""The command palette's presets: every model, GPU and recipe by name; choosing one applies it."""

from __future__ import annotations

from functools import partial
from typing import Protocol, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from memtui.engine.units import format_gib



class AppliesPresets(Protocol):
    """What the palette needs of the app (the app module imports this one, not the other way round)."""

    def apply_preset(self, kind: str, preset_id: str) -> None: ...


def preset_commands() -> list[tuple[str, str, str, str]]:
    """(palette text, kind, preset id, help) for every preset, models first."""
    from memtui.engine.model import presets

    commands = []
    for spec in presets.models().values():
        commands.append((f"Model: {spec.name}", "model", spec.id,
                         f"{spec.id} · {spec.params / 1e9:.2f}B parameters · {spec.num_layers} layers"))
    for gpu in presets.gpus().values():
        commands.append((f"GPU: {gpu.name} ({format_gib(gpu.memory_bytes)})", "gpu", gpu.id,
                         f"{gpu.id} · compute capability {gpu.compute_capability}" + (" · bf16" if gpu.bf16 else "")))
    for recipe in presets.recipes().values():
        commands.append((f"Recipe: {recipe.name}", "recipe", recipe.id, recipe.description))
    return commands


class PresetCommands(Provider):
    """Fuzzy search over presets; 'Model: …', 'GPU: …', 'Recipe: …'."""

    async def startup(self) -> None:
        self._commands = preset_commands()

    def _apply(self, kind: str, preset_id: str) -> None:
        cast(AppliesPresets, self.app).apply_preset(kind, preset_id)

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
