"""Data-parallel wrappers for a live run under torchrun: DDP, ZeRO-1, FSDP2 (ZeRO-2/3).

Imported only in a worker that runs with WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU).

- zero 0: DistributedDataParallel (every rank holds everything, gradients all-reduced);
- zero 1: DDP + ZeroRedundancyOptimizer (optimizer states sharded);
- zero 2: FSDP2 `fully_shard` per decoder layer and at the root, parameters kept
  gathered from forward to backward (reshard_after_forward=False);
- zero 3: FSDP2 with parameters resharded after forward (full sharding).
"""

from __future__ import annotations

from typing import Any

import torch

from memtui.engine.model.specs import TrainingConfig


def wrap(model: torch.nn.Module, layers: list[torch.nn.Module], config: TrainingConfig, device: torch.device) -> Any:
    if config.zero >= 2:
        from torch.distributed.fsdp import fully_shard

        reshard = config.zero == 3
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
