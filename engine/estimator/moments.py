"""The forward and backward moments of a step: what is live beyond the model states.

For every family memtui knows (memtui.engine.estimator.sim: Llama, Mistral, Qwen2,
Qwen3, Phi-3, GPT-2, Gemma, Gemma-2, Mixtral) every candidate peak of the
replayed step is evaluated at this batch size and sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.estimator.sim.core import lf_eval
from memtui.engine.estimator.sim.families import Dims, Options
from memtui.engine.estimator.sim.program import compile_step, dims_for, options_for
from memtui.engine.model.specs import TrainingConfig


@dataclass(frozen=True)
class Moment:
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
    tokens = config.batch_size * config.seq_len
    return int(lf_eval(program.offloaded_bytes, (1.0, float(tokens), float(tokens * config.seq_len),
                                                   float(config.seq_len), float(config.seq_len ** 2))))


def held_after_forward(config: TrainingConfig, model: ModelSpec, *, layers: int) -> int:
    """Bytes the step holds from the loss's end to backward's first op, beyond weights and gradients."""
    program = compile_step(dims_for(model, config.tp), options_for(config, model), layers)
    tokens = config.batch_size * config.seq_len
    return int(lf_eval(program.held_after_forward, (1.0, float(tokens), float(tokens * config.seq_len),
                                                      float(config.seq_len), float(config.seq_len ** 2))))


@lru_cache(maxsize=4096)
def _evaluate(dims: Dims, options: Options, layers: int, batch_size: int, seq_len: int, pp: int) -> tuple[Moment, ...]:
    program = compile_step(dims, options, layers)
    tokens = batch_size * seq_len
    values = (1.0, float(tokens), float(tokens * seq_len), float(seq_len), float(seq_len * seq_len))
    # 1F1B: the first pipeline stage holds the saved activations of pp micro-batches.
    in_flight = (pp - 1) * layers * lf_eval(program.layer_saved, values)
    moments = []
    for candidate in program.candidates:
        live = candidate.live
        extra = in_flight if candidate.phase != "forward" else 0.0
        moments.append(
            Moment(
                phase=candidate.phase,
                autocast_weights=int(lf_eval(live["weights"], values)),
                gradients=int(lf_eval(live["gradients"], values)),
                activations=int(lf_eval(live["activations"], values) + extra),
                temporary=int(lf_eval(live["temporary"], values)),
            )
        )
    return tuple(moments)
