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
from memtui.engine.model.validation import UNFUSED_OPTIMIZERS

# bitsandbytes 8-bit blockwise states: 1 byte per value plus an fp32 absmax per 256-value block.
ADAM8BIT_STATE_BYTES = 2 * (1 + 4 / 256)
# bitsandbytes keeps tensors smaller than this in 32-bit state.
ADAM8BIT_MIN_NUMEL = 4096


@dataclass(frozen=True)
class OptimizerCost:
    state_bytes: float  # per trainable parameter, steady state
    step_temp_bytes: int  # transient peak during optimizer.step()


def state_bytes_per_param(config: TrainingConfig, param_bytes: int) -> float:
    """Optimizer state bytes per trainable parameter (GaLore handled by the caller)."""
    state_dtype = 4 if config.master_weights else param_bytes
    master = 4 if config.master_weights else 0
    per_state = {
        "adamw": 2 * state_dtype,
        "adamw-8bit": ADAM8BIT_STATE_BYTES,
        "sgd": 0,
        "sgd-momentum": state_dtype,
        "lion": state_dtype,
        "adafactor": 0,  # factored: computed per matrix by the caller
        "galore-adamw": 2 * state_dtype,
    }[config.optimizer]
    return per_state + master


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
    if optimizer == "adamw-8bit":
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
