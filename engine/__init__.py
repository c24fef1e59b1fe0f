"""memtui's engine: specs, presets, the analytic estimator, the tracer, live runs and telemetry.

Nothing in this package imports Textual, and nothing imports torch at import time:
the estimator is pure Python so the TUI can call it on every keypress.
"""

__version__ = "0.1.0"
