"""The forward and backward moments of a step: what is live beyond the model states.

For every family memtui knows (memtui.engine.estimator.sim: Llama, Mistral, Qwen2,
Qwen3, Phi-3, GPT-2, Gemma, Gemma-2, Mixtral) every candidate peak of the
replayed step is evaluated at this batch size and sequence length.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.estimator.sim.core import lf_eval, lf_values
from memtui.engine.estimator.sim.families import Dims, Options
from memtui.engine.estimator.sim.program import compile_step, dims_for, options_for
from memtui.engine.model.specs import TrainingConfig


class Moment(NamedTuple):
    """Bytes live at one candidate peak, beyond weights and optimizer states."""

    phase: str  # forward | loss | backward
    autocast_weights: int  # 16-bit weight copies autocast caches (or gathers) for the forward
    gradients: int  # parameter gradients accumulated so far (unsharded)
    activations: int
    temporary: int


def activation_moments(config: TrainingConfig, model: ModelSpec, *, layers: int) -> list[Moment]:
    dims, options = dims_for(model, config.tp), options_for(config, model)
    return list(_evaluate(dims, options, layers, config.batch_size, config.seq_len, config.pp))


def offloaded_bytes(config: TrainingConfig, model: ModelSpec, *, layers: int) -> int:
    """--activation-offload: host (pinned) bytes of the saved activations at the end of the forward."""
    if not config.activation_offload:
        return 0
    program = compile_step(dims_for(model, config.tp), options_for(config, model), layers)
    return int(lf_eval(program.offloaded_bytes, lf_values(config.batch_size * config.seq_len, config.seq_len)))


def held_after_forward(config: TrainingConfig, model: ModelSpec, *, layers: int) -> int:
    """Bytes the step holds from the loss's end to backward's first op, beyond weights and gradients."""
    program = compile_step(dims_for(model, config.tp), options_for(config, model), layers)
    return int(lf_eval(program.held_after_forward, lf_values(config.batch_size * config.seq_len, config.seq_len)))


@lru_cache(maxsize=4096)
def _evaluate(dims: Dims, options: Options, layers: int, batch_size: int, seq_len: int, pp: int) -> tuple[Moment, ...]:
    program = compile_step(dims, options, layers)
    values = lf_values(batch_size * seq_len, seq_len)
    # 1F1B: the first pipeline stage holds the saved activations of pp micro-batches.
    in_flight = (pp - 1) * layers * lf_eval(program.layer_saved, values)
    # lf_eval written out (the same products and sums, in the same order): an estimate at a new shape evaluates
    # four forms for each of some thirty candidates.
    one, per_token, per_token_seq, per_position, per_position_sq = values
    return tuple(
        Moment(
            phase,
            int(w0 * one + w1 * per_token + w2 * per_token_seq + w3 * per_position + w4 * per_position_sq),
            int(g0 * one + g1 * per_token + g2 * per_token_seq + g3 * per_position + g4 * per_position_sq),
            int(a0 * one + a1 * per_token + a2 * per_token_seq + a3 * per_position + a4 * per_position_sq
                + (in_flight if phase != "forward" else 0.0)),
            int(t0 * one + t1 * per_token + t2 * per_token_seq + t3 * per_position + t4 * per_position_sq),
        )
        for phase, w0, w1, w2, w3, w4, g0, g1, g2, g3, g4, a0, a1, a2, a3, a4, t0, t1, t2, t3, t4 in program.rows)
