"""How the budget's components look everywhere in the app: label, colour, and a glyph for NO_COLOR.

Colours are theme variables, so light and dark themes (and NO_COLOR's
monochrome filter) restyle them; glyphs keep the segments apart when colour
is off.
"""

from __future__ import annotations

from textual.content import Content

from memtui.engine.model.specs import COMPONENT_LABELS, COMPONENT_NAMES

SHORT_LABELS = {
    "weights": "weights",
    "gradients": "grads",
    "optimizer_states": "optimizer",
    "activations": "activations",
    "temporary": "temp",
    "overhead": "CUDA",
}
COMPONENT_STYLES = {
    "weights": "$primary",
    "gradients": "$primary-lighten-3",
    "optimizer_states": "$accent",
    "activations": "$success",
    "temporary": "$error-lighten-1",
    "overhead": "$foreground-darken-3",
}
NO_COLOR_GLYPHS = {
    "weights": "█",
    "gradients": "▓",
    "optimizer_states": "▒",
    "activations": "░",
    "temporary": "≡",
    "overhead": ":",
}
FREE_STYLE = "$foreground 20%"


def glyph(name: str, no_color: bool) -> str:
    return NO_COLOR_GLYPHS[name] if no_color else "█"


def swatch(name: str, no_color: bool) -> Content:
    """The legend's coloured square for a component."""
    return Content.styled(glyph(name, no_color), COMPONENT_STYLES[name])


__all__ = ["COMPONENT_LABELS", "COMPONENT_NAMES", "COMPONENT_STYLES", "SHORT_LABELS", "glyph", "swatch"]
