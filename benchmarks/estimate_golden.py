"""Every estimate's JSON over a broad grid, to check that a speed-up changes no figure.

    uv run python benchmarks/estimate_golden.py OUT.jsonl       # write one line per configuration
    cmp before.jsonl after.jsonl                                 # byte for byte

The grid is every model preset (generic ones excepted: they need a traced program) crossed with option sets
that reach every branch of the estimator: LoRA/QLoRA (nf4, int8, k-bit prep, adapter dtypes, the head),
ZeRO 1-3 with and without offload, HSDP, tensor and pipeline parallelism (every schedule), checkpointing
modes, activation offload, gradient accumulation, optimizer in backward, loss modes, compile, every optimizer
and implementation, on two GPUs. Each configuration is estimated twice (cold, then warm from the memo caches)
and then once more in reverse order once every cache is full; an answer that differs from the first is
written too, so a cache that returns a stale or shared answer shows as a difference. A refused configuration
writes its InputError instead.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from memtui.engine.errors import InputError  # noqa: E402
from memtui.engine.estimator import estimate  # noqa: E402
from memtui.engine.model.presets import models, resolve_model  # noqa: E402
from memtui.engine.model.specs import TrainingConfig  # noqa: E402

OPTION_SETS: list[dict] = [
    {},
    {"precision": "32-true"},
    {"precision": "16-mixed", "optimizer_impl": "for-loop"},
    {"precision": "bf16-true", "optimizer_impl": "fused"},
    {"precision": "bf16-true", "master_weights": True},
    {"checkpointing": "selective"},
    {"checkpointing": "selective-op"},
    {"checkpointing": "full", "attention": "eager"},
    {"optimizer": "adamw-8bit"},
    {"optimizer": "paged-adamw-8bit"},
    {"optimizer": "paged-adamw", "precision": "bf16-true"},
    {"optimizer": "sgd"},
    {"optimizer": "sgd-momentum", "gpus": 4, "zero": 1},
    {"optimizer": "adafactor"},
    {"optimizer": "adafactor", "gpus": 4, "zero": 1},
    {"optimizer": "lion", "optimizer_impl": "for-loop"},
    {"optimizer": "galore-adamw", "galore_rank": 64},
    {"lora_rank": 16},
    {"lora_rank": 16, "lora_targets": "all-linear", "precision": "bf16-true"},
    {"lora_rank": 8, "lora_targets": "all-linear,lm_head", "lora_dropout": 0.1, "lora_dtype": "compute",
     "precision": "bf16-true"},
    {"lora_rank": 16, "lora_targets": "all-linear", "quant": "nf4", "kbit_prep": True},
    {"lora_rank": 16, "lora_targets": "all-linear", "quant": "nf4", "bnb_version": "legacy"},
    {"lora_rank": 16, "quant": "int8", "optimizer": "adafactor"},
    {"lora_rank": 16, "lora_targets": "all-linear", "quant": "nf4", "optimizer": "paged-adamw-8bit",
     "checkpointing": "full"},
    {"gpus": 8, "zero": 1},
    {"gpus": 8, "zero": 2},
    {"gpus": 8, "zero": 3, "checkpointing": "full"},
    {"gpus": 8, "zero": 3, "shard_group": 4},
    {"gpus": 4, "zero": 2, "offload": "optimizer"},
    {"gpus": 4, "zero": 3, "offload": "optimizer+params"},
    {"gpus": 1, "zero": 2, "offload": "optimizer"},
    {"gpus": 8, "zero": 3, "lora_rank": 16, "lora_targets": "all-linear"},
    {"gpus": 8, "tp": 2},
    {"gpus": 8, "tp": 4, "zero": 3, "attention": "eager"},
    {"gpus": 8, "pp": 2, "batch_size": 4, "microbatches": 4},
    {"gpus": 8, "pp": 4, "batch_size": 8, "microbatches": 8, "pp_schedule": "gpipe"},
    {"gpus": 8, "pp": 2, "batch_size": 4, "microbatches": 4, "pp_schedule": "interleaved-1f1b"},
    {"gpus": 16, "pp": 2, "tp": 2, "zero": 1, "batch_size": 2, "microbatches": 2},
    {"grad_accum": 4},
    {"grad_accum": 4, "gpus": 8, "zero": 2},
    {"grad_accum": 2, "gpus": 8, "zero": 3, "checkpointing": "full"},
    {"optimizer_in_backward": True},
    {"optimizer_in_backward": True, "optimizer_impl": "for-loop", "precision": "bf16-true"},
    {"loss": "chunked"},
    {"loss": "chunked", "loss_chunks": 16, "loss_dtype": "compute"},
    {"loss": "fused-linear", "checkpointing": "full"},
    {"activation_offload": True},
    {"activation_offload": True, "checkpointing": "full"},
    {"compile": True},
    {"compile": True, "checkpointing": "selective"},
    {"stack": "torchtune", "loss": "chunked", "checkpointing": "full", "precision": "bf16-true"},
]
SHAPES = [(1, 512), (4, 1024)]
GPU_IDS = ["h100-80gb", "rtx-4090"]


def configurations() -> list[dict]:
    grid = []
    for model_id in models():
        if resolve_model(model_id).family == "generic":
            continue
        for options, (batch, seq), gpu in itertools.product(OPTION_SETS, SHAPES, GPU_IDS):
            if "batch_size" not in options:
                options = {**options, "batch_size": batch}
            grid.append({"model": model_id, "gpu": gpu, "seq_len": seq, **options})
    return grid


def answer(options: dict) -> str:
    try:
        return estimate(TrainingConfig(**options)).model_dump_json()
    except (InputError, ValueError) as error:
        return f"error: {type(error).__name__}: {error}"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    grid = configurations()
    lines, answers = [], []
    for options in grid:
        cold = answer(options)
        warm = answer(options)
        answers.append(cold)
        lines.append(f"{options}\t{cold}\n")
        if warm != cold:
            lines.append(f"{options}\tWARM DIFFERS\t{warm}\n")
    for options, first in reversed(list(zip(grid, answers))):  # every cache full, met in the other order
        again = answer(options)
        if again != first:
            lines.append(f"{options}\tREVERSED DIFFERS\t{again}\n")
    Path(sys.argv[1]).write_text("".join(lines))
    print(f"{len(lines)} lines -> {sys.argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
