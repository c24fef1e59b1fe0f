"""ZeRO-1 as PyTorch runs it, shared by the data-parallel trace and the live run."""

from __future__ import annotations

import inspect
from typing import Any


def zero_redundancy(optimizer: Any) -> Any:
    """The same torch.optim optimizer, its states sharded across ranks by ZeroRedundancyOptimizer; memtui's own
    wrappers (master weights, GaLore, Lion) are left whole: they cannot be rebuilt from a class and defaults."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if type(optimizer).__module__.split(".")[:2] != ["torch", "optim"]:
        return optimizer
    accepted = inspect.signature(type(optimizer).__init__).parameters  # groups carry keys __init__ does not take
    defaults = {key: value for key, value in optimizer.param_groups[0].items() if key != "params" and key in accepted}
    params = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    return ZeroRedundancyOptimizer(params, optimizer_class=type(optimizer), **defaults)
