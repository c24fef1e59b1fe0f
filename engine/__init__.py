"""memtui's engine: everything that is not a front end.

- `model`: what is trained on what: ModelSpec from a config.json, GpuSpec, TrainingConfig, presets, validation;
- `estimator`: the analytic budget, pure Python, microseconds;
- `planning`: fit, the savings ladder, export;
- `torchside`: the real architecture built with the options applied (torch, imported lazily);
- `trace`: one training step on fake tensors; `live`: a real scaled-down run in a worker process;
- `telemetry`: NVML and host memory readings.

Nothing here imports Textual or the front ends (import-linter enforces it), and nothing imports torch
at import time: the estimator runs on every keypress.
"""
