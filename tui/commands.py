"""The command palette: the app's actions by name, and every model, GPU and recipe (choosing one applies it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Protocol, cast

from textual.app import SystemCommand
from textual.command import DiscoveryHit, Hit, Hits, Provider

from memtui.engine.units import format_gib

if TYPE_CHECKING:
    from textual.app import App

# The app's actions the palette offers, with the words a person would search for; the help text and the
# key come from the app's own binding, so palette and key always do the same thing.
PALETTE_ACTIONS = {
    "explain": "Explain the focused option",
    "pin": "Pin / unpin this configuration (compare)",
    "make_it_fit": "Make it fit: apply the fit suggestion",
    "export": "Export the budget (Markdown and JSON)",
    "live_run": "Live run: train a scaled-down copy",
    "live_settings": "Live run settings",
    "stop_run": "Stop the live run",
    "show_budget": "Back to the budget",
    "toggle_theme": "Theme: switch between dark and light",
}
REPLACED_SYSTEM_COMMANDS = {"Theme"}  # Textual's theme picker offers themes `t` never returns to


def action_commands(app: App) -> Iterator[SystemCommand]:
    """The palette entries for PALETTE_ACTIONS that are available now (check_action), each naming its key."""
    bindings = {binding.action: binding for binding in app.BINDINGS if not isinstance(binding, tuple)}
    for action, title in PALETTE_ACTIONS.items():
        binding = bindings.get(action)
        if app.check_action(action, ()) is False:
            continue
        key = f" ({app.get_key_display(binding)})" if binding is not None else ""
        help_text = (binding.tooltip or binding.description) if binding is not None else title
        yield SystemCommand(title + key, help_text, partial(app.run_action, action))


class AppliesPresets(Protocol):
    """What the palette needs of the app (the app module imports this one, not the other way round)."""

    def apply_preset(self, kind: str, preset_id: str) -> None: ...

    def load_model(self, text: str) -> None: ...


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


class HubCacheCommands(Provider):
    """'Model from the Hugging Face cache: org/name' for each model already in the local Hub cache."""

    async def startup(self) -> None:
        from memtui.engine.model.hub import cached_model_ids

        # Off the UI thread: the cache may be large, or on a network file system.
        ids = await asyncio.to_thread(cached_model_ids)
        self._commands = [(f"Model from the Hugging Face cache: {hub_id}", hub_id) for hub_id in ids]

    def _load(self, hub_id: str) -> None:
        cast(AppliesPresets, self.app).load_model(hub_id)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, hub_id in self._commands:
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), partial(self._load, hub_id), text=text)

    async def discover(self) -> Hits:
        for text, hub_id in self._commands:
            yield DiscoveryHit(text, partial(self._load, hub_id), text=text)
