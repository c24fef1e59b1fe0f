"""Pipeline parallelism: each rank's step under torch.distributed.pipelining's schedules, as `memtui trace --pp`
runs them (memtui.engine.trace.pipeline).

A rank runs its stage (two under interleaved 1F1B) once per micro-batch forward and once backward, in the order
its schedule gives (`rank_actions`, after torch's `_step_microbatches` / `_get_1f1b_rank_ops`). Each micro-batch
is a step of the stage's own program (memtui.engine.estimator.sim: its layers, the embedding on the first stage,
the head and loss on the last, a received input and output gradient on the others) at batch / microbatches
sequences. Between its forward and its backward a micro-batch holds what its stage's program holds then
(`held_after_forward`), so every moment of an action is that action's candidate peak plus every other micro-batch
in flight. Gradients accumulate in place across micro-batches, as in gradient accumulation: the first backward of a
stage makes them, the later ones hold them whole and add each new one (a temporary until added).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

from memtui.engine.estimator.layout import pipeline_rank_stages, pipeline_stage_layers
from memtui.engine.estimator.moments import Moment
from memtui.engine.estimator.sim.core import lf_eval
from memtui.engine.estimator.sim.families import Dims, Options
from memtui.engine.estimator.sim.program import compile_step, dims_for, options_for
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import TrainingConfig

Action = tuple[str, int, int]  # ("F" or "B", stage index, micro-batch)


def rank_actions(config: TrainingConfig, rank: int) -> list[Action]:
    """The forwards and backwards rank `rank` runs in one step, in order."""
    micro, pp = config.microbatches, config.pp
    if config.pp_schedule == "gpipe":  # ScheduleGPipe: every forward, then every backward
        return [("F", rank, mb) for mb in range(micro)] + [("B", rank, mb) for mb in range(micro)]
    if config.pp_schedule == "1f1b":
        # Schedule1F1B._step_microbatches: pp - rank warm-up forwards, then one backward and one forward each.
        warmup = min(micro, pp - rank)
        actions: list[Action] = [("F", rank, mb) for mb in range(warmup)]
        forwards, backwards = warmup, 0
        while backwards < micro:
            actions.append(("B", rank, backwards))
            backwards += 1
            if forwards < micro:
                actions.append(("F", rank, forwards))
                forwards += 1
        return actions
    # ScheduleInterleaved1F1B._calculate_single_rank_operations, _get_warmup_ops and _get_1f1b_rank_ops.
    local = config.virtual_stages
    rounds = max(1, micro // pp)
    per_round = micro // rounds
    warmup = min((local - 1) * per_round + 2 * (pp - 1 - rank), micro * local)
    fwd_bwd = local * micro - warmup

    def forward_stage(op: int) -> int:
        return (op // per_round) % local * pp + rank

    def backward_stage(op: int) -> int:
        return (local - 1 - (op - warmup) // per_round % local) * pp + rank

    forwards: dict[int, int] = defaultdict(int)
    backwards: dict[int, int] = defaultdict(int)
    actions = []

    def add(kind: str, stage: int, counter: dict[int, int]) -> None:
        actions.append((kind, stage, counter[stage]))
        counter[stage] += 1

    for op in range(warmup + fwd_bwd + warmup):
        if op < warmup + fwd_bwd:
            add("F", forward_stage(op), forwards)
        if op >= warmup:
            add("B", backward_stage(op), backwards)
    return actions


@dataclass(frozen=True)
class _StageProgram:
    forward: tuple[Moment, ...]  # forward and loss candidates of one micro-batch (gradients: 0)
    backward: tuple[Moment, ...]  # backward candidates (gradients: as the stage's first backward makes them)
    held: int  # what a micro-batch holds between its forward and backward
    gradients: int  # the stage's parameter gradients, all made


@lru_cache(maxsize=1024)
def _stage_program(d: Dims, opts: Options, layers: int, first: bool, last: bool, tokens: int,
                   seq_len: int) -> _StageProgram:
    program = compile_step(d, opts, layers, first, last)
    values = (1.0, float(tokens), float(tokens * seq_len), float(seq_len), float(seq_len * seq_len))
    forward, backward = [], []
    for candidate in program.candidates:
        live = candidate.live
        moment = Moment(phase=candidate.phase, autocast_weights=int(lf_eval(live["weights"], values)),
                        gradients=int(lf_eval(live["gradients"], values)),
                        activations=int(lf_eval(live["activations"], values)),
                        temporary=int(lf_eval(live["temporary"], values)))
        (backward if candidate.phase == "backward" else forward).append(moment)
    return _StageProgram(tuple(forward), tuple(backward), int(lf_eval(program.held_after_forward, values)),
                         int(lf_eval(program.gradients_end, values)))


def stage_roles(config: TrainingConfig, model: ModelSpec, rank: int) -> list[tuple[int, int, bool, bool]]:
    """(stage index, layers, first, last) of each stage rank `rank` runs."""
    total = config.pp * config.virtual_stages
    split = pipeline_stage_layers(model.num_layers, total)
    return [(index, split[index], index == 0, index == total - 1) for index in pipeline_rank_stages(config)[rank]]


def pipeline_moments(config: TrainingConfig, model: ModelSpec, rank: int, largest_gradient: int) -> list[Moment]:
    """Rank `rank`'s candidate peaks through the schedule (gradients: what is alive; a gradient made by a later
    micro-batch's backward, at most `largest_gradient`, is a temporary until added in place)."""
    d, opts = dims_for(model, config.tp), options_for(config, model)
    tokens = config.microbatch_size * config.seq_len
    programs = {index: _stage_program(d, opts, layers, first, last, tokens, config.seq_len)
                for index, layers, first, last in stage_roles(config, model, rank)}
    # A stage's input (its received hidden states, in the weights' dtype) and the input's gradient it sends back.
    hidden_states = (tokens * model.hidden_size * config.weight_bytes + 511) // 512 * 512
    first_stages = {index for index, _layers, first, _last in stage_roles(config, model, rank) if first}
    last_stages = {index for index, _layers, _first, last in stage_roles(config, model, rank) if last}
    in_flight: dict[tuple[int, int], int] = {}
    kept = 0  # the last stage's inputs of the micro-batches done: each loss in the schedule's _internal_losses
    # keeps its graph, whose AccumulateGrad node keeps the input leaf, until the step ends
    sending = 0  # Schedule1F1B: the last backward's send ops (`bwd_sends`), kept until the next backward's
    done: set[int] = set()  # stages whose gradients exist
    moments: list[Moment] = []
    for kind, stage, microbatch in rank_actions(config, rank):
        program = programs[stage]
        resident = sum(programs[other].gradients for other in done if other != stage)
        if kind == "F":
            others = sum(in_flight.values()) + kept
            own = program.gradients if stage in done else 0
            moments += [moment_plus(moment, resident + own, others, sending) for moment in program.forward]
            in_flight[(stage, microbatch)] = program.held
            continue
        del in_flight[(stage, microbatch)]
        others = sum(in_flight.values()) + kept
        if stage not in done:
            moments += [moment_plus(moment, resident + moment.gradients, others, sending)
                        for moment in program.backward]
            done.add(stage)
        else:
            before = 0
            for moment in program.backward:  # accumulating: the stage's gradients whole, the new one a temporary
                made = min(max(moment.gradients - before, 0), largest_gradient)
                before = moment.gradients
                moments.append(moment_plus(moment, resident + program.gradients, others, made + sending))
        if stage in last_stages and stage not in first_stages:
            kept += hidden_states
        if config.pp_schedule == "1f1b" and stage not in first_stages:
            sending = hidden_states
    return moments


def moment_plus(moment: Moment, gradients: int, held: int, temporary: int) -> Moment:
    return Moment(phase=moment.phase, autocast_weights=moment.autocast_weights, gradients=gradients,
                  activations=moment.activations + held, temporary=moment.temporary + temporary)
