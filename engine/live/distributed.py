"""Data-parallel wrappers for a live run under torchrun: DDP, ZeRO-1, FSDP2 (ZeRO-2/3).

Imported only in a worker that runs with WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU).

- zero 0: DistributedDataParallel (every rank holds everything, gradients all-reduced);
- zero 1: DDP + ZeroRedundancyOptimizer (optimizer states sharded);
- zero 2: FSDP2 `fully_shard` per decoder layer and at the root, parameters kept
  gathered from forward to backward (reshard_after_forward=False);
- zero 3: FSDP2 with parameters resharded after forward (full sharding);
- FSDP2's MixedPrecisionPolicy casts the gathered parameters to bf16 with --fsdp-param-dtype compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from memtui.engine.model.specs import TrainingConfig

# How long a rank waits for gloo's worker thread to let go of a collective's tensors.
GLOO_RELEASE_TIMEOUT_S = 5.0


def wrap(model: torch.nn.Module, layers: list[torch.nn.Module], config: TrainingConfig, device: torch.device) -> Any:
    if config.zero >= 2:
        from torch.distributed.fsdp import fully_shard

        from memtui.engine.torchside.sharding import fsdp_policy

        reshard = config.zero == 3
        policy = fsdp_policy(config)
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)
        if device.type == "cpu":
            for module in [*layers, model]:
                module.set_custom_all_gather(_gloo_all_gather())
                module.set_custom_reduce_scatter(_gloo_reduce_scatter())
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def released_by_gloo(tensors: list[torch.Tensor], collective: Callable[[], Any]) -> Any:
    """Run a synchronous collective, then wait until gloo's worker thread has dropped its tensors.

    ProcessGroupGloo marks a work complete before its worker thread releases the
    work's tensors, so the rank resumes while the thread still holds them; under
    load the thread runs late and a buffer the rank has already dropped is freed
    steps later, raising the measured peak by a whole layer at random (seen in CI:
    one decoder layer's unsharded parameters, 7% of the peak). NCCL's work frees
    them at wait(), as the rank expects. Waiting here makes a CPU run free each
    buffer where CUDA does, so its peak no longer depends on the scheduler.
    """
    # The worker holds the tensors themselves and views of their storages: count both.
    storages = list({t.untyped_storage()._cdata: t.untyped_storage() for t in tensors}.values())
    unique = list({id(t): t for t in tensors}.values())

    def references() -> list[int]:
        return [t._use_count() for t in unique] + [torch._C._storage_Use_Count(s._cdata) for s in storages]

    held = references()
    result = collective()
    deadline = time.monotonic() + GLOO_RELEASE_TIMEOUT_S
    while time.monotonic() < deadline and any(now > before for now, before in zip(references(), held, strict=True)):
        time.sleep(0.0001)
    return result


def _gloo_all_gather() -> Any:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    class GlooAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            call = super().__call__
            if async_op:  # the rank waits later; FSDP2's default unshard is synchronous
                return call(output_tensor, input_tensor, group, async_op)
            return released_by_gloo([output_tensor, input_tensor],
                                    lambda: call(output_tensor, input_tensor, group, async_op))

    return GlooAllGather()


def _gloo_reduce_scatter() -> Any:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class GlooReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            call = super().__call__
            if async_op:
                return call(output_tensor, input_tensor, group, op, async_op)
            return released_by_gloo([output_tensor, input_tensor],
                                    lambda: call(output_tensor, input_tensor, group, op, async_op))

    return GlooReduceScatter()
