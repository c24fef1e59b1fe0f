"""The live-run panel: press a key, a scaled-down copy trains for real beside its prediction.

`LivePanel` is self-contained: mount it, call `start_run(config)` and `stop_run()`
(bind them to r and s). The worker process is started and read from a thread
worker (`LiveRunController`); torch is never imported in the TUI process.
"""

from memtui.tui.live.panel import LivePanel

__all__ = ["LivePanel"]
