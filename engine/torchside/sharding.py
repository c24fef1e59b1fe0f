"""ZeRO-1 and FSDP2's mixed precision as PyTorch runs them, shared by the data-parallel trace and the live run."""

from __future__ import annotations

import inspect
from typing import Any

from memtui.engine.model.specs import TrainingConfig


def zero_redundancy(optimizer: Any, process_group: Any = None) -> Any:
    """The same torch.optim optimizer, its states sharded across the ranks of `process_group` (default: the world)
    by ZeroRedundancyOptimizer; memtui's own wrappers (master weights, GaLore, Lion) are left whole: they cannot be
    rebuilt from a class and defaults."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if type(optimizer).__module__.split(".")[:2] != ["torch", "optim"]:
        return optimizer
    accepted = inspect.signature(type(optimizer).__init__).parameters  # groups carry keys __init__ does not take
    defaults = {key: value for key, value in optimizer.param_groups[0].items() if key != "params" and key in accepted}
    params = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    return ZeroRedundancyOptimizer(params, optimizer_class=type(optimizer), process_group=process_group, **defaults)


def fsdp_policy(config: TrainingConfig):
    """FSDP2's MixedPrecisionPolicy for `config`: the parameters cast to bf16 for compute and the gradients reduced
    in fp32 with --fsdp-param-dtype compute (torchtitan's apply_fsdp), else none (autocast casts)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if config.fsdp_casts:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
