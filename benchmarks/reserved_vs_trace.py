"""The estimator's reserved peak against the trace's, both replayed through the allocator model (docs/reserved.md).

    uv run python benchmarks/reserved_vs_trace.py

Llama-3 shrunk to 4 layers of width 512 with a 32k vocabulary (tests/test_reserved.py's small_llama), batch 2 x
512, H100 preset, one row per option set. Prints MiB; asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from memtui.engine.estimator.overhead import cublas_workspace_bytes  # noqa: E402
from memtui.engine.estimator.reserved import replay_step  # noqa: E402
from memtui.engine.model.presets import resolve_gpu  # noqa: E402
from memtui.engine.model.specs import TrainingConfig  # noqa: E402
from memtui.engine.trace.runner import trace  # noqa: E402
from tests.test_reserved import small_llama  # noqa: E402

ROWS = [
    dict(precision="32-true"),
    dict(precision="bf16-mixed", checkpointing="full"),
    dict(precision="bf16-true", optimizer_impl="for-loop"),
    dict(precision="bf16-true", optimizer_impl="fused"),
    dict(precision="bf16-mixed", checkpointing="selective", loss="chunked"),
    dict(precision="32-true", optimizer="sgd-momentum"),
    dict(precision="bf16-true", attention="eager", lora_rank=4, lora_targets="all-linear"),
]


def main() -> None:
    spec, gpu = small_llama(), resolve_gpu("h100-80gb")
    print("| options | trace reserved | estimate reserved |\n| --- | ---: | ---: |")
    for options in ROWS:
        config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", batch_size=2, seq_len=512, **options)
        traced = trace(config, model=spec, gpu=gpu).allocator["reserved_peak_bytes"]
        estimated = replay_step(config, spec, gpu, cublas_workspace_bytes(gpu)).reserved_peak_bytes
        label = ", ".join(f"{key}={value}" for key, value in options.items())
        print(f"| {label} | {traced >> 20} MiB | {estimated >> 20} MiB |")


if __name__ == "__main__":
    main()
