"""Optimizer state per parameter and the step's temporaries, per implementation.

The temporaries follow what torch.optim's code allocates:
- foreach AdamW: `torch._foreach_sqrt(exp_avg_sqs)` materialises a copy of every
  second moment of a (device, dtype) group at once;
- for-loop AdamW: `exp_avg_sq.sqrt() / bias_correction2_sqrt` holds two
  temporaries the size of the largest parameter;
- fused AdamW: one kernel, updates in place, no temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import PAGED_OPTIMIZERS, UNFUSED_OPTIMIZERS

# bitsandbytes 8-bit blockwise states: 1 byte per value plus an fp32 absmax per 256-value block.
ADAM8BIT_STATE_BYTES = 2 * (1 + 4 / 256)
# bitsandbytes keeps tensors smaller than this in 32-bit state.
ADAM8BIT_MIN_NUMEL = 4096
ADAM8BIT_BLOCK = 256  # values per absmax of the blockwise 8-bit states
# bitsandbytes' paged optimizers (is_paged=True) put a state in CUDA unified memory (cudaMallocManaged, outside
# PyTorch's caching allocator) only for tensors of at least this many values (Optimizer8bit.get_state_buffer);
# smaller ones, and the 8-bit states' absmax, come from torch.zeros on the device as usual.
PAGED_MIN_NUMEL = 100_000
BNB_ADAM_OPTIMIZERS = ("adamw-8bit",) + PAGED_OPTIMIZERS  # states laid out by bitsandbytes' Optimizer8bit


@dataclass(frozen=True)
class OptimizerCost:
    state_bytes: float  # per trainable parameter, steady state
    step_temp_bytes: int  # transient peak during optimizer.step()


def state_bytes_per_param(config: TrainingConfig, param_bytes: int) -> float:
    """Optimizer state bytes per trainable parameter (GaLore handled by the caller)."""
    state_dtype = 4 if config.master_weights else param_bytes
    master = 4 if config.master_weights and param_bytes < 4 else 0  # fp32 parameters are their own masters
    per_state = {
        "adamw": 2 * state_dtype,
        "adamw-8bit": ADAM8BIT_STATE_BYTES,
        "sgd": 0,
        "sgd-momentum": state_dtype,
        "lion": state_dtype,
        "adafactor": 0,  # factored: computed per matrix by the caller
        "galore-adamw": 2 * state_dtype,
        "paged-adamw-8bit": ADAM8BIT_STATE_BYTES,  # per tensor: bnb_adam_state_bytes
        "paged-adamw": 8,  # bitsandbytes' 32-bit states are fp32 whatever the parameter's dtype
    }[config.optimizer]
    return per_state + master


def _round512(n: int) -> int:
    return (n + 511) // 512 * 512  # each state is its own block of the CUDA caching allocator


def bnb_adam_state_bytes(optimizer: str, numels: list[int]) -> tuple[int, int]:
    """(bytes through the caching allocator, bytes in CUDA unified memory) of bitsandbytes' Adam states over
    trainable tensors of these sizes, as Optimizer2State.init_state makes them: two moments per tensor, uint8
    with an fp32 absmax per 256 values (8-bit), fp32 under `min_8bit_size` (4096 values) or for the 32-bit
    optimizer; a paged optimizer's moments of tensors of at least 100,000 values in unified memory."""
    eight_bit = optimizer != "paged-adamw"
    paged = optimizer in PAGED_OPTIMIZERS
    allocated = unified = 0
    for numel in numels:
        if eight_bit and numel >= ADAM8BIT_MIN_NUMEL:
            moment = numel
            allocated += 2 * _round512(-(-numel // ADAM8BIT_BLOCK) * 4)
        else:
            moment = 4 * numel
        if paged and numel >= PAGED_MIN_NUMEL:
            unified += 2 * moment  # not rounded: cudaMallocManaged, not the caching allocator
        else:
            allocated += 2 * _round512(moment)
    return allocated, unified


def adafactor_state_params(shapes: list[tuple[int, int]], vector_params: int) -> int:
    """Row and column second-moment factors for matrices, a full vector for the rest."""
    return sum(rows + cols for rows, cols in shapes) + vector_params


def galore_state_params(shapes: list[tuple[int, int]], rank: int, keeps_full_factor: bool = False) -> tuple[int, int]:
    """(Adam state values, projector values) for GaLore over the given matrices.

    GaLore projects each m x n gradient onto its shorter side: the low-rank
    gradient is max(m, n) x r, and so are both Adam moments; the projector is
    min(m, n) x r. galore-torch slices the projector out of the SVD's factor, and
    when no dtype cast copies it (fp32 gradients) the slice keeps the whole
    min(m, n) x min(m, n) factor alive: `keeps_full_factor`.
    """
    states = 0
    projectors = 0
    for rows, cols in shapes:
        r = min(rank, rows, cols)
        states += 2 * max(rows, cols) * r
        projectors += min(rows, cols) * (min(rows, cols) if keeps_full_factor else r)
    return states, projectors


def step_temp_bytes(
    config: TrainingConfig, *, group_state_bytes: int, largest_tensor_state_bytes: int
) -> int:
    """Transient bytes during the step for the configured implementation.

    group_state_bytes: one optimizer state (e.g. exp_avg_sq) over all trainable
    params of the largest (device, dtype) group; largest_tensor_state_bytes: the
    same for the single largest trainable tensor.
    """
    impl = config.optimizer_impl
    optimizer = config.optimizer
    if optimizer in ("sgd", "sgd-momentum"):
        return 0
    if optimizer in BNB_ADAM_OPTIMIZERS:
        return 0  # bitsandbytes' kernels update in place
    if optimizer == "galore-adamw":
        # A loop over tensors whatever the implementation; the largest (plain AdamW) tensor holds its
        # denominator, the bias-corrected moment and the update at once.
        return 3 * largest_tensor_state_bytes
    if impl == "fused" and optimizer not in UNFUSED_OPTIMIZERS:  # the others run `fused` as their for-loop
        return 0
    if impl == "foreach":
        if optimizer in ("adamw", "galore-adamw"):
            return group_state_bytes
        if optimizer == "lion":
            return group_state_bytes
        if optimizer == "adafactor":
            return group_state_bytes
    if optimizer == "adafactor":
        return largest_tensor_state_bytes  # one variance estimate, updated in place into the step
    # for-loop: two temporaries of the largest tensor at once
    return 2 * largest_tensor_state_bytes
