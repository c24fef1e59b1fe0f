"""What is trained on what: the model (from a config.json), the GPU, the training options, presets and
their validation. Pure Python: pydantic, no torch."""
