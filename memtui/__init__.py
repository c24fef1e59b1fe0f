"""memtui: what one training step needs per GPU, predicted, traced and measured.

The one import package memtui installs. In the source tree its subpackages are
the top-level folders (memtui/engine -> ../engine, likewise tui and cli); in a
wheel they are copied in, with the presets as data in memtui/presets.

Layers, enforced by import-linter (see pyproject.toml): the front ends `cli` and
`tui` sit side by side above `engine`; `engine` imports neither, nor Textual.
"""

__version__ = "0.1.0"
