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
    moments = []
    for candidate in program.candidates:
        live = candidate.live
        w, g, a, t = live["weights"], live["gradients"], live["activations"], live["temporary"]
        extra = in_flight if candidate.phase != "forward" else 0.0
        moments.append(Moment(
            candidate.phase,
            int(w[0] * one + w[1] * per_token + w[2] * per_token_seq + w[3] * per_position + w[4] * per_position_sq),
            int(g[0] * one + g[1] * per_token + g[2] * per_token_seq + g[3] * per_position + g[4] * per_position_sq),
            int(a[0] * one + a[1] * per_token + a[2] * per_token_seq + a[3] * per_position + a[4] * per_position_sq
                + extra),
            int(t[0] * one + t[1] * per_token + t[2] * per_token_seq + t[3] * per_position + t[4] * per_position_sq),
        ))
    return tuple(moments)
