"""The forward and backward moments of a step: what is live beyond the model states.

For every family memtui knows (memtui.engine.estimator.sim: Llama, Mistral, Qwen2,
Qwen3, Phi-3, GPT-2, Gemma, Gemma-2, Mixtral) every candidate peak of the
replayed step is a linear form of the shape: evaluated at one batch size and
sequence length (step_forms), or kept as forms (symbolic_step_forms, Shaped) for
the estimator's plan of the step, which each new shape then evaluates.
"""

from __future__ import annotations

from functools import lru_cache
from operator import ge
from typing import NamedTuple

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.estimator.sim.core import LF, ZERO, lf_eval, lf_values
from memtui.engine.estimator.sim.families import Dims, Options
from memtui.engine.estimator.sim.program import compile_step, dims_for, options_for
from memtui.engine.model.specs import TrainingConfig


class ShapeDependent(Exception):
    """An operation on Shaped bytes that only the shape can answer (a comparison, a product): the caller evaluates
    the step at the shape instead."""


class Shaped:
    """Bytes at a shape not chosen yet: `offset` plus, for each form, int(the form at the shape), as the estimate
    at that shape computes them. It only adds and subtracts integers, as the step's moments do with activations
    and temporaries, so the sum at a shape equals the estimate's there exactly (integer sums do not round);
    anything else raises ShapeDependent."""

    __slots__ = ("forms", "offset")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, forms: tuple[LF, ...], offset: int = 0):
        self.forms, self.offset = forms, offset

    def __add__(self, other: object) -> Shaped:
        if isinstance(other, Shaped):
            return Shaped(self.forms + other.forms, self.offset + other.offset)
        if isinstance(other, int):
            return Shaped(self.forms, self.offset + other)
        raise ShapeDependent(f"{type(other).__name__} + Shaped")

    __radd__ = __add__

    def __sub__(self, other: object) -> Shaped:
        if isinstance(other, int):
            return Shaped(self.forms, self.offset - other)
        raise ShapeDependent(f"Shaped - {type(other).__name__}")

    def _needs_the_shape(self, *_args: object) -> None:
        raise ShapeDependent("an operation on bytes that depends on the shape")

    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __bool__ = __int__ = __index__ = __float__ = _needs_the_shape
    __mul__ = __rmul__ = __floordiv__ = __rfloordiv__ = __truediv__ = __mod__ = __divmod__ = __neg__ = _needs_the_shape
    __rsub__ = __pow__ = __abs__ = __round__ = _needs_the_shape  # type: ignore[assignment]

    def at(self, values: LF) -> int:
        return self.offset + sum(int(lf_eval(form, values)) for form in self.forms)


def undominated(values: list[int | Shaped], groups: list[object]) -> list[int]:
    """The indices of `values` that no earlier one of the same group matches or exceeds at every shape, judged by a
    sufficient rule: the offsets, and the forms pairwise coefficient by coefficient (what every form multiplies is
    >= 0; a product and a rounded sum only grow with their terms, and so does int()). As the rule is transitive, an
    index is held to the earlier ones kept."""
    width = max((len(value.forms) for value in values if isinstance(value, Shaped)), default=0)
    kept: list[int] = []
    kept_by_group: dict[object, list[tuple[int, ...]]] = {}
    for index, (value, group) in enumerate(zip(values, groups)):
        forms, offset = (value.forms, value.offset) if isinstance(value, Shaped) else ((), value)
        figures = (offset, *sum(forms, ()), *ZERO * (width - len(forms)))
        earlier = kept_by_group.setdefault(group, [])
        if not any(other[0] >= offset and all(map(ge, other, figures)) for other in earlier):
            earlier.append(figures)
            kept.append(index)
    return kept


class Moment(NamedTuple):
    """Bytes live at one candidate peak, beyond weights and optimizer states."""

    phase: str  # forward | loss | backward
    autocast_weights: int  # 16-bit weight copies autocast caches (or gathers) for the forward
    gradients: int  # parameter gradients accumulated so far (unsharded)
    activations: int
    temporary: int
    buffered: int = 0  # --optimizer-in-backward: of `temporary`, gradients still summing in an input buffer
    stepped: int = 0  # --optimizer-in-backward, at a GRAD_READY moment: of `gradients`, those stepped there
    segment: str = ""  # where in the step (StepCandidate.segment): FSDP2 gathers by place


class StepForms(NamedTuple):
    """What the step's moments take from the replayed program: ints at one shape, or Shaped (symbolic_step_forms)."""

    moments: list[Moment]
    held_after_forward: int | Shaped  # bytes held from the loss's end to backward's first op, beyond weights and grads
    offloaded: int | Shaped  # --activation-offload: host bytes of the saved activations at the forward's end


def step_forms(config: TrainingConfig, model: ModelSpec, *, layers: int, layer_gathers: bool = False) -> StepForms:
    """The step's moments, held and offloaded bytes at config's shape (one pipeline stage: no micro-batches in
    flight; memtui.engine.estimator.pipeline schedules those). `layer_gathers`: FSDP2 with ZeRO-3 (compile_step's)."""
    _one_stage(config)
    dims, options = dims_for(model, config.tp), options_for(config, model)
    program = compile_step(dims, options, layers, layer_gathers=layer_gathers)
    values = lf_values(config.batch_size * config.seq_len, config.seq_len)
    return StepForms(list(_evaluate(dims, options, layers, config.batch_size, config.seq_len, layer_gathers)),
                     int(lf_eval(program.held_after_forward, values)),
                     int(lf_eval(program.offloaded_bytes, values)) if config.activation_offload else 0)


def symbolic_step_forms(config: TrainingConfig, model: ModelSpec, *, layers: int,
                        layer_gathers: bool = False) -> StepForms:
    """step_forms at every shape that replays config's program (program_shape's), a form where a figure depends on
    the shape."""
    _one_stage(config)
    dims, options = dims_for(model, config.tp), options_for(config, model)
    program = compile_step(dims, options, layers, layer_gathers=layer_gathers)
    return StepForms(list(_symbolic_moments(dims, options, layers, layer_gathers)), _shaped(program.held_after_forward),
                     _shaped(program.offloaded_bytes) if config.activation_offload else 0)


@lru_cache(maxsize=256)
def _symbolic_moments(dims: Dims, options: Options, layers: int, layer_gathers: bool) -> tuple[Moment, ...]:
    """A program's candidates as Moments of Shaped figures (option sets that differ in ZeRO, GPUs, ... share it)."""
    program = compile_step(dims, options, layers, layer_gathers=layer_gathers)
    return tuple(Moment(row[0], *(_shaped(tuple(row[start:start + 5])) for start in range(1, len(row), 5)),
                        segment=segment) for row, segment in zip(program.rows, program.segments))


def _one_stage(config: TrainingConfig) -> None:
    if config.pp > 1:
        raise ValueError("the step's forms are one pipeline stage's; memtui.engine.estimator.pipeline schedules --pp")


def _shaped(form: LF) -> int | Shaped:
    """A form's bytes: an int where no shape changes them (only the constant term: int() of it, as at any shape)."""
    if not any(form[1:]):
        return int(lf_eval(form, _ANY_SHAPE))
    return Shaped((form,))


_ANY_SHAPE = lf_values(1, 1)


def offloaded_bytes(config: TrainingConfig, model: ModelSpec, *, layers: int) -> int:
    """--activation-offload: host (pinned) bytes of the saved activations at the end of the forward."""
    if not config.activation_offload:
        return 0
    program = compile_step(dims_for(model, config.tp), options_for(config, model), layers)
    return int(lf_eval(program.offloaded_bytes, lf_values(config.batch_size * config.seq_len, config.seq_len)))


@lru_cache(maxsize=4096)
def _evaluate(dims: Dims, options: Options, layers: int, batch_size: int, seq_len: int,
              layer_gathers: bool) -> tuple[Moment, ...]:
    program = compile_step(dims, options, layers, layer_gathers=layer_gathers)
    if options.step_in_backward:  # rows with the buffered and stepped gradients' figures too
        values = lf_values(batch_size * seq_len, seq_len)
        return tuple(Moment(row[0], *(int(lf_eval(row[start:start + 5], values)) for start in range(1, len(row), 5)),
                            segment=segment) for row, segment in zip(program.rows, program.segments))
    one, per_token, per_token_seq, per_position, per_position_sq = lf_values(batch_size * seq_len, seq_len)
    # lf_eval written out (the same products and sums, in the same order)
    return tuple(
        Moment(
            phase,
            int(w0 * one + w1 * per_token + w2 * per_token_seq + w3 * per_position + w4 * per_position_sq),
            int(g0 * one + g1 * per_token + g2 * per_token_seq + g3 * per_position + g4 * per_position_sq),
            int(a0 * one + a1 * per_token + a2 * per_token_seq + a3 * per_position + a4 * per_position_sq),
            int(t0 * one + t1 * per_token + t2 * per_token_seq + t3 * per_position + t4 * per_position_sq),
            segment=segment,
        )
        for (phase, w0, w1, w2, w3, w4, g0, g1, g2, g3, g4, a0, a1, a2, a3, a4, t0, t1, t2, t3, t4), segment
        in zip(program.rows, program.segments))
