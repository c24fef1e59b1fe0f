"""Pipeline parallelism: each rank's step under torch.distributed.pipelining's schedules, as `memtui trace --pp`
runs them (memtui.engine.trace.pipeline).

A rank runs its stage (two under interleaved 1F1B) once per micro-batch forward and once backward, in the order
its schedule gives, with the schedule's sends and receives between them (`rank_schedule`): ScheduleGPipe's and
Schedule1F1B's `_step_microbatches` as written, and for interleaved 1F1B the action list
`_PipelineScheduleRuntime` runs, lowered as torch lowers it (`_add_unshard_reshard`, `_add_reduce_grad`,
`_add_send_recv`, `_add_wait_send`). Each micro-batch is a step of the stage's own program
(memtui.engine.estimator.sim: its layers, the embedding on the first stage, the head and loss on the last, a
received input and output gradient on the others) at batch / microbatches sequences. Between its forward and its
backward a micro-batch holds what its stage's program holds then (`held_after_forward`); beside it live the
buffers the schedule's communication keeps: a receive buffer from its receive until the forward or backward that
takes it, a sent output or input gradient until the send's wait (or the list holding it) lets it go. Every moment
of an action is that action's candidate peak plus all of that. Gradients accumulate in place across micro-batches:
a stage's first backward makes them, the later ones hold them whole, each new one a temporary until AccumulateGrad
adds it (the candidate's own temporaries already hold it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from functools import lru_cache

from memtui.engine.estimator.layout import (
    ddp_tensor_parallel_embedding_gradients,
    pipeline_rank_stages,
    pipeline_stages_model,
    pipeline_stage_layers,
    tensor_parallel_embedding_gradient_extra,
    tensor_parallel_partial_adapter_gradients,
    tensor_parallel_vocabulary_slice,
    tensor_parallel_whole_vocabulary_gradient,
)
from memtui.engine.estimator.moments import Moment
from memtui.engine.estimator.sim.core import (
    DTYPE_BYTES,
    HEAD_GATHER,
    LAYER_BACKWARD_STARTS,
    LOWEST_LAYER_GATHER,
    lf_eval,
    lf_values,
)
from memtui.engine.estimator.sim.families import Dims, Options
from memtui.engine.estimator.sim.program import compile_step, dims_for, options_for, replayed_middle_layer
from memtui.engine.model.architectures import ModelSpec, attention_layer_types
from memtui.engine.model.specs import TrainingConfig

Action = tuple[str, int, int]  # (kind, stage index, micro-batch); kinds below

# Compute: a forward, a full backward. Communication (torch's _ComputationType names where it has them): a receive
# buffer made (RECV_F: the stage's input, RECV_B: its output's gradient), a send posted (SEND_F: the output,
# SEND_B: the input's gradient), a send's tensor let go (WAIT_SEND_F / WAIT_SEND_B). The runtime's UNSHARD,
# RESHARD, REDUCE_GRAD and WAIT_REDUCE_GRAD (FSDP's, no-ops without it; REDUCE_GRAD scales gradients in place)
# only order the lowering.
FORWARD, BACKWARD = "F", "B"
RECV_F, RECV_B, SEND_F, SEND_B, WAIT_SEND_F, WAIT_SEND_B = (
    "RECV_F", "RECV_B", "SEND_F", "SEND_B", "WAIT_SEND_F", "WAIT_SEND_B")
UNSHARD, RESHARD, REDUCE_GRAD, WAIT_REDUCE_GRAD = "UNSHARD", "RESHARD", "REDUCE_GRAD", "WAIT_REDUCE_GRAD"
NO_MICROBATCH = -1
NEXT_STEP = "NEXT_STEP"  # gradient accumulation: the schedule's next step() begins (_accumulated_schedule)
_MAX_ACTIVE_STAGES = 3  # _PipelineScheduleRuntime's default max_active_stages (and unshard_lookahead "full")


def rank_actions(config: TrainingConfig, rank: int) -> list[Action]:
    """The forwards and backwards rank `rank` runs in one step, in order."""
    return [action for action in rank_schedule(config, rank) if action[0] in (FORWARD, BACKWARD)]


def rank_schedule(config: TrainingConfig, rank: int) -> list[Action]:
    """Rank `rank`'s step: its forwards and backwards and the sends and receives between them, in order."""
    if config.pp_schedule == "gpipe":
        return _gpipe(config, rank)
    if config.pp_schedule == "1f1b":
        return _one_f_one_b(config, rank)
    return list(_runtime_schedule(config.pp, config.virtual_stages, config.microbatches)[rank])


def _accumulated_schedule(config: TrainingConfig, rank: int) -> list[Action]:
    """Rank `rank`'s schedule once per accumulation step, as torchtitan's loop calls step() before the optimizer's,
    each after the first opened by NEXT_STEP. From the second step on every step is the same: two stand for all."""
    schedule = rank_schedule(config, rank)
    return schedule + [(NEXT_STEP, NO_MICROBATCH, NO_MICROBATCH), *schedule] * (min(config.grad_accum, 2) - 1)


def _edges(stage: int, total: int) -> tuple[bool, bool]:
    """Whether a stage receives its input (not the first) and its output's gradient (not the last)."""
    return stage != 0, stage != total - 1


def _gpipe(config: TrainingConfig, rank: int) -> list[Action]:
    """ScheduleGPipe._step_microbatches: every forward (its send kept in fwd_sends_to_wait until all are done),
    then every backward; the backward's send list (`ops`) lives until the next receive list replaces it."""
    micro = config.microbatches
    receives, sends = _edges(rank, config.pp)
    actions: list[Action] = []
    for mb in range(micro):
        actions += [(RECV_F, rank, mb)] * receives + [(FORWARD, rank, mb)] + [(SEND_F, rank, mb)] * sends
    actions += [(WAIT_SEND_F, rank, mb) for mb in range(micro) if sends]
    for mb in range(micro):
        actions += [(RECV_B, rank, mb)] * sends
        if mb and receives:
            actions.append((WAIT_SEND_B, rank, mb - 1))
        actions += [(BACKWARD, rank, mb)] + [(SEND_B, rank, mb)] * receives
    actions += [(WAIT_SEND_B, rank, micro - 1)] * receives
    return actions


def _one_f_one_b(config: TrainingConfig, rank: int) -> list[Action]:
    """Schedule1F1B._step_microbatches: pp - rank warm-up forwards, then one backward and one forward each, then
    the remaining backwards. A forward's send is waited for after the next forward (warm-up) or before the next
    backward; a backward's send list (`bwd_sends`) lives until the next backward's replaces it."""
    micro = config.microbatches
    receives, sends = _edges(rank, config.pp)
    warmup = min(micro, config.pp - rank)
    actions: list[Action] = []

    def forward(mb: int) -> None:
        actions.extend([(RECV_F, rank, mb)] * receives + [(FORWARD, rank, mb)])

    def backward(mb: int) -> None:
        actions.append((BACKWARD, rank, mb))
        if receives:
            actions.append((SEND_B, rank, mb))
            if mb:
                actions.append((WAIT_SEND_B, rank, mb - 1))

    for mb in range(warmup):
        forward(mb)
        if mb and sends:
            actions.append((WAIT_SEND_F, rank, mb - 1))
        actions += [(SEND_F, rank, mb)] * sends
    forwards = warmup
    for mb in range(micro):
        actions += [(RECV_B, rank, mb)] * sends
        if mb <= micro - warmup and sends:  # the 1B1F loop first waits for the last forward's send
            actions.append((WAIT_SEND_F, rank, forwards - 1))
        backward(mb)
        if forwards < micro:
            forward(forwards)
            actions += [(SEND_F, rank, forwards)] * sends
            forwards += 1
    actions += [(WAIT_SEND_B, rank, micro - 1)] * receives
    return actions


@lru_cache(maxsize=64)
def _runtime_schedule(pp: int, local: int, micro: int) -> tuple[tuple[Action, ...], ...]:
    """ScheduleInterleaved1F1B's `pipeline_order_with_comms`, every rank's: its compute order
    (`_calculate_single_rank_operations`) lowered as `_prepare_schedule_with_comms` lowers it by default."""
    total = pp * local
    lowered = {rank: _add_reduce_grad(_add_unshard_reshard(_interleaved_compute(pp, local, micro, rank)), micro)
               for rank in range(pp)}
    with_comms = _add_send_recv(lowered, pp, total)
    return tuple(tuple(_add_wait_send(with_comms[rank])) for rank in range(pp))


def _interleaved_compute(pp: int, local: int, micro: int, rank: int) -> list[Action]:
    """ScheduleInterleaved1F1B._calculate_single_rank_operations (_get_warmup_ops, _get_1f1b_rank_ops) without
    its idle slots, which the lowering drops."""
    rounds = max(1, micro // pp)
    per_round = micro // rounds
    warmup = min((local - 1) * per_round + 2 * (pp - 1 - rank), micro * local)
    fwd_bwd = local * micro - warmup

    def forward_stage(op: int) -> int:
        return (op // per_round) % local * pp + rank

    def backward_stage(op: int) -> int:
        return (local - 1 - (op - warmup) // per_round % local) * pp + rank

    counts: dict[tuple[str, int], int] = defaultdict(int)
    actions: list[Action] = []

    def add(kind: str, stage: int) -> None:
        actions.append((kind, stage, counts[(kind, stage)]))
        counts[(kind, stage)] += 1

    for op in range(warmup + fwd_bwd + warmup):
        if op < warmup + fwd_bwd:
            add(FORWARD, forward_stage(op))
        if op >= warmup:
            add(BACKWARD, backward_stage(op))
    return actions


def _add_unshard_reshard(actions: list[Action]) -> list[Action]:
    """torch's _add_unshard_reshard at its defaults (max_active_stages 3, unshard_lookahead "full"): an UNSHARD
    before a stage's first action, a RESHARD once it leaves the next three stages to compute."""
    def next_stages(start: int) -> list[int]:
        seen: list[int] = []
        for _kind, stage, _mb in actions[start:]:
            if stage not in seen:
                seen.append(stage)
                if len(seen) >= _MAX_ACTIVE_STAGES:
                    break
        return seen

    active: list[int] = []
    lowered: list[Action] = []
    for index, action in enumerate(actions):
        resident = next_stages(index)
        evict = [stage for stage in active if stage not in resident]
        fetch = [stage for stage in resident if stage not in active]
        for stage in evict:
            active.remove(stage)
            lowered.append((RESHARD, stage, NO_MICROBATCH))
        for stage in fetch:
            active.append(stage)
            lowered.append((UNSHARD, stage, NO_MICROBATCH))
        lowered.append(action)
    lowered += [(RESHARD, stage, NO_MICROBATCH) for stage in active]
    return lowered


def _add_reduce_grad(actions: list[Action], micro: int) -> list[Action]:
    """torch's _add_reduce_grad: REDUCE_GRAD and its wait after a stage's last backward."""
    backwards: dict[int, int] = defaultdict(int)
    lowered: list[Action] = []
    for action in actions:
        lowered.append(action)
        kind, stage, _mb = action
        if kind == BACKWARD:
            backwards[stage] += 1
            if backwards[stage] == micro:
                lowered += [(REDUCE_GRAD, stage, NO_MICROBATCH), (WAIT_REDUCE_GRAD, stage, NO_MICROBATCH)]
    return lowered


def _add_send_recv(compute: dict[int, list[Action]], pp: int, total: int) -> dict[int, list[Action]]:
    """torch's _add_send_recv: the ranks take their next action in turn, one each per round, once its input is
    there; a forward's send goes right after it, and the receive it matches onto the receiving rank's list at that
    moment (so a rank makes a receive buffer as soon as the sender has computed, well before it uses it)."""
    comms: dict[int, list[Action]] = {rank: [] for rank in compute}
    done: dict[int, set[Action]] = {rank: set() for rank in compute}
    pending = {rank: list(actions) for rank, actions in compute.items() if actions}

    def crosses(action: Action) -> bool:
        kind, stage, _mb = action
        if kind == FORWARD:
            return stage != total - 1 and (stage + 1) % pp != stage % pp
        if kind == BACKWARD:
            return stage != 0 and (stage - 1) % pp != stage % pp
        return False

    def ready(action: Action, rank: int) -> bool:
        kind, stage, mb = action
        if kind == FORWARD and stage != 0:
            return (RECV_F, stage, mb) in done[rank] or (FORWARD, stage - 1, mb) in done[rank]
        if kind == BACKWARD and stage != total - 1:
            return (RECV_B, stage, mb) in done[rank] or (BACKWARD, stage + 1, mb) in done[rank]
        return True

    while pending:
        progress = False
        for rank in sorted(pending):
            action = pending[rank][0]
            if not ready(action, rank):
                continue
            comms[rank].append(action)
            done[rank].add(action)
            if crosses(action):
                kind, stage, mb = action
                send = (SEND_F if kind == FORWARD else SEND_B, stage, mb)
                receiver = stage + 1 if kind == FORWARD else stage - 1
                receive = (RECV_F if kind == FORWARD else RECV_B, receiver, mb)
                comms[rank].append(send)
                done[rank].add(send)
                comms[receiver % pp].append(receive)
                done[receiver % pp].add(receive)
            pending[rank].pop(0)
            if not pending[rank]:
                del pending[rank]
            progress = True
        if not progress:
            raise AssertionError("the interleaved schedule cannot place its sends and receives")
    return comms


def _add_wait_send(actions: list[Action]) -> list[Action]:
    """torch's _add_wait_send: a forward's send is waited for right after the backward of the same stage and
    micro-batch (the peer has used it by then), every backward's send at the step's end."""
    pending: list[Action] = []
    lowered: list[Action] = []
    for action in actions:
        lowered.append(action)
        kind, stage, mb = action
        if kind in (SEND_F, SEND_B):
            pending.append(action)
        if kind == BACKWARD and (SEND_F, stage, mb) in pending:
            pending.remove((SEND_F, stage, mb))
            lowered.append((WAIT_SEND_F, stage, mb))
    lowered += [(WAIT_SEND_F if kind == SEND_F else WAIT_SEND_B, stage, mb) for kind, stage, mb in pending]
    return lowered


@dataclass(frozen=True)
class _StageProgram:
    forward: tuple[Moment, ...]  # forward and loss candidates of one micro-batch (gradients: 0)
    forward_segments: tuple[str, ...]  # where each forward candidate is (embed_fwd, first_fwd, ..., head_fwd)
    backward_segments: tuple[str, ...]
    backward: tuple[Moment, ...]  # backward candidates (gradients: as the stage's first backward makes them)
    held: int  # what a micro-batch holds between its forward and backward
    gradients: int  # the stage's parameter gradients, all made


@lru_cache(maxsize=1024)
def _stage_program(d: Dims, opts: Options, layers: int, first: bool, last: bool, tokens: int,
                   seq_len: int, layer_starts: bool = False) -> _StageProgram:
    # later micro-batches accumulate
    program = compile_step(d, opts, layers, first, last, accumulating=True, layer_starts=layer_starts)
    values = lf_values(tokens, seq_len)
    forward, backward, segments, backward_segments = [], [], [], []
    for candidate in program.candidates:
        live = candidate.live
        moment = Moment(phase=candidate.phase, autocast_weights=int(lf_eval(live["weights"], values)),
                        gradients=int(lf_eval(live["gradients"], values)),
                        activations=int(lf_eval(live["activations"], values)),
                        temporary=int(lf_eval(live["temporary"], values)))
        (backward if candidate.phase == "backward" else forward).append(moment)
        (backward_segments if candidate.phase == "backward" else segments).append(candidate.segment)
    return _StageProgram(tuple(forward), tuple(segments), tuple(backward_segments), tuple(backward), int(lf_eval(program.held_after_forward, values)),
                         int(lf_eval(program.gradients_end, values)))


def _stage_options(config: TrainingConfig, model: ModelSpec) -> Options:
    """The stages' program options. A micro-batch is what a stage runs: the chunked loss's per-sequence copies and
    the fused loss's row chunks follow its sequences (the other shape-dependent options keep the whole batch's)."""
    opts = options_for(config, model)
    if config.loss == "standard":
        return opts
    micro = options_for(config.model_copy(update={"batch_size": config.microbatch_size}), model)
    return replace(opts, batched=micro.batched, loss_chunk_rows=micro.loss_chunk_rows)


def _stage_layer_kinds(config: TrainingConfig, model: ModelSpec, index: int, layers: int) -> Options:
    """Stage `index`'s program options, from its own layers' kinds where they differ."""
    stage_model = pipeline_stages_model(config, model, [index])
    if stage_model is model:
        return _stage_options(config, model)
    opts = _stage_options(config, stage_model)
    if opts.rope_pairs > 1:
        # Gemma 3: the stage's lowest full-attention layer keeps the second (cos, sin) pair until its backward
        lowest = attention_layer_types(stage_model).index("full_attention")
        opts = replace(opts, rope_holder="first" if lowest == 0 else "last" if lowest == layers - 1 else "mid")
    return opts


def stage_roles(config: TrainingConfig, model: ModelSpec, rank: int) -> list[tuple[int, int, bool, bool]]:
    """(stage index, layers, first, last) of each stage rank `rank` runs."""
    total = config.pp * config.virtual_stages
    split = pipeline_stage_layers(model.num_layers, total)
    return [(index, split[index], index == 0, index == total - 1) for index in pipeline_rank_stages(config)[rank]]


@dataclass(frozen=True)
class StageShards:
    """FSDP2 on one pipeline stage, as `memtui trace` runs it (fully_shard per decoder layer and on the stage):
    unsharded bytes of each layer's group, lowest first (DeepSeek-V3's dense layers hold far fewer than its MoE
    ones), and of the stage's root group (the embedding on the first stage, the final norm and head on the last),
    and of their gradients."""

    layer_weights: tuple[int, ...]
    layer_gradients: tuple[int, ...]
    root_weights: int
    head_gradients: int  # the root's gradients made at backward's start (a last stage's head and norm)
    root_gradients: int
    dp: int
    reshard: bool  # reshard_after_forward (ZeRO-3)
    head: bool = False  # a last stage's: its root group holds the head, gathered again after the loss's backward
    host: bool = False  # CPUOffloadPolicy: each reduced shard copied to host memory, the device's let go

    @property
    def layers(self) -> int:
        return len(self.layer_weights)

    def top(self, count: int) -> int:
        """Gathered bytes of the stage's `count` highest layers (a backward gathers them from the last down)."""
        return sum(self.layer_weights[self.layers - count:]) if count > 0 else 0

    def layers_done(self, made: int) -> int:
        """How many layers, from the last down, a backward has finished once it made `made` bytes of their
        gradients."""
        done = 0
        for gradients in reversed(self.layer_gradients):
            if made < gradients:
                break
            made -= gradients
            done += 1
        return done


def pipeline_moments(config: TrainingConfig, model: ModelSpec, rank: int) -> list[Moment]:
    """Rank `rank`'s candidate peaks through its schedule (gradients: what is alive)."""
    return [moment for moment, _gathered in pipeline_sharded_moments(config, model, rank)]


def pipeline_sharded_moments(config: TrainingConfig, model: ModelSpec, rank: int,
                             shards: dict[int, StageShards] | None = None) -> list[tuple[Moment, int]]:
    """Rank `rank`'s candidate peaks through its schedule, each with the bytes FSDP2 holds gathered then (its
    unsharded parameters and all-gather buffers; 0 without `shards`, the FSDP2 layout of each of its stages).

    Under FSDP2 PipelineStage runs every backward with gradient sync and resharding after backward off: each
    micro-batch's gradients accumulate unsharded, and the layers a backward gathered stay gathered until a forward
    reshards them (ZeRO-3's reshard_after_forward) or the stage's last backward is done, when every group is
    resharded and its gradients reduce-scattered in turn (a flat input of the group's gradients, a 1/dp output)."""
    d, opts = dims_for(model, config.tp), _stage_options(config, model)
    tokens = config.microbatch_size * config.seq_len
    roles = stage_roles(config, model, rank)
    # Each stage's own kinds of layers: DeepSeek-V3's leading dense ones (none past the first stages), Gemma 3's
    # full-attention ones among its sliding-window ones
    stage_opts = {index: _stage_layer_kinds(config, model, index, layers) for index, layers, *_role in roles}
    programs = {index: _stage_program(d, stage_opts[index], layers, first, last, tokens, config.seq_len,
                                      shards is not None)
                for index, layers, first, last in roles}
    middle_layers = {index: replayed_middle_layer(layers, stage_opts[index].dense_layers)
                     for index, layers, _first, _last in roles}
    # DTensor's embedding backward makes the whole vocabulary's gradient, and the rank's Shard(0) gradient keeps it
    # (memtui.engine.estimator.layout.tensor_parallel_embedding_gradient_extra): beyond the stage program's 1/tp.
    # Under FSDP2 with gradient sync off it is the unsharded parameter's gradient, kept whole until the reduce-scatter.
    whole = tensor_parallel_whole_vocabulary_gradient(config, model)
    extra = (tensor_parallel_embedding_gradient_extra(config, model) if shards is None
             else whole - tensor_parallel_vocabulary_slice(config, model) if whole else 0)
    vocabulary_extra = {index: extra if first else 0 for index, _layers, first, _last in roles}
    # Under DDP (PyTorch's _pre_dp_module_transform) the whole vocabulary's gradient is a temporary of the
    # embedding's backward: the first one clones the rank's slice out of it, a later one adds it in place.
    ddp_whole, rank_slice = ddp_tensor_parallel_embedding_gradients(config, model)
    reduced: set[int] = set()  # stages whose gradients FSDP2 has reduce-scattered (the step's end)

    # The traced plan's Rowwise lora_B gradients come out of DTensor's backward Partial, every column of B, and
    # AccumulateGrad keeps them so; the stage program's engine sums each to the shard's shape.
    partial_extra = {index: tensor_parallel_partial_adapter_gradients(config, model, layers) * config.adapter_bytes
                     if config.uses_lora else 0 for index, layers, _first, _last in roles}

    def stage_gradients(index: int) -> int:
        whole = programs[index].gradients + vocabulary_extra[index] + partial_extra[index]
        if index in reduced:
            return 0 if shards[index].host else whole // shards[index].dp
        return whole

    # What crosses between stages: a micro-batch's hidden states, or their gradient, in the dtype of the embedding's
    # output (the stage program's received input: the frozen base's under LoRA, 16-bit under QLoRA without k-bit
    # prep); under sequence parallelism this rank's 1/tp of the tokens (torch.chunk's first share).
    sent_tokens = config.microbatch_size * -(-config.seq_len // opts.sequence_parallel)
    residual_bytes = DTYPE_BYTES[opts.base if opts.lora_rank > 0 else opts.params]
    hidden_states = (sent_tokens * model.hidden_size * residual_bytes + 511) // 512 * 512
    last_stages = {index for index, _layers, first, last in roles if last and not first}
    # Under DDP PipelineStage keeps each sent output until the micro-batch's backward has run (DDP's reducer needs
    # the live outputs: `_output_slot_is_releasable`), not until the send's wait.
    outputs_kept = config.dp > 1 and config.zero <= 1
    in_flight: dict[tuple[int, int], int] = {}
    # Receive buffers not yet taken and sent tensors not yet let go; the tracer counts the forward's (the input,
    # the output) as activations, the backward's (the output's gradient, the input's) as temporaries.
    buffers: dict[Action, int] = {}
    kept = 0  # the last stage's inputs of the micro-batches done: each loss in the schedule's _internal_losses
    # keeps its graph, whose AccumulateGrad node keeps the input leaf, until the step ends
    done: set[int] = set()  # stages whose gradients exist
    backwards: dict[int, int] = defaultdict(int)
    previous: dict[int, str] = {}  # each stage's last compute action: whether a backward left its layers gathered
    moments: list[tuple[Moment, int]] = []

    def beside() -> tuple[int, int]:
        """What the other micro-batches and the communication hold: (activations, temporaries)."""
        forward_side = sum(size for (kind, _s, _m), size in buffers.items() if kind in (RECV_F, SEND_F))
        return sum(in_flight.values()) + kept + forward_side, sum(buffers.values()) - forward_side

    def gathered_elsewhere(stage: int) -> int:
        """What the rank's other stages hold gathered (interleaved 1F1B): all their layers once a backward ran."""
        if shards is None:
            return 0
        return sum(shards[other].root_weights + sum(shards[other].layer_weights)
                   for other in shards if other != stage and other not in reduced
                   and (previous.get(other) == BACKWARD or (other in previous and not shards[other].reshard)))

    def forward_gathered(stage: int, segment: str) -> int:
        """By where the candidate is: before the layers (the root's all-gather buffer beside its copy, kept until the
        first layer's all-gather), in layer i, at the head (the last layer's buffer kept until the root's
        post-forward), after the forward (ZeRO-3 has resharded the root)."""
        if shards is None:
            return 0
        shard = shards[stage]
        root, layer, count = shard.root_weights, shard.layer_weights, shard.layers
        # the layer the candidate is in: the replayed middle layer is one of the stage's layers of its kind
        index = {"first_fwd": 0, "mid_fwd": middle_layers[stage], "last_fwd": count - 1}.get(segment)
        if previous.get(stage) == BACKWARD or (not shard.reshard and stage in previous):
            # gathered by the backward before (ZeRO-2: by the step's first forward): ZeRO-3 reshards each layer
            # as its forward ends
            if not shard.reshard:
                return root + sum(layer)
            if segment in ("loss_fwd", "forward_end"):  # the loss is computed after the stage's forward
                return 0
            return root + (sum(layer[index:]) if index is not None else sum(layer) if segment in ("inputs", "embed_fwd")
                           else 0)
        if segment in ("inputs", "embed_fwd"):
            return 2 * root
        if shard.reshard:  # each layer gathered in turn, its all-gather buffer held until the next one's
            return 0 if segment in ("loss_fwd", "forward_end") else root + (2 * layer[index] if index is not None
                                                                            else layer[-1])
        # ZeRO-2's first forward: the layers gathered so far and the last all-gather buffer
        if index is not None:
            return root + sum(layer[:index + 1]) + layer[index]
        return root + sum(layer) + (0 if segment in ("loss_fwd", "forward_end") else layer[-1])

    def backward_gathered(stage: int, made: int, segment: str) -> int:
        """`made`: the stage's gradients its first backward has made by this moment (the layers done)."""
        if shards is None:
            return 0
        shard = shards[stage]
        if previous.get(stage) == BACKWARD or not shard.reshard:
            return shard.root_weights + sum(shard.layer_weights)
        if segment == "loss_bwd":
            return 0  # the loss's backward, before the head's pre-backward gathers the root again
        if segment == HEAD_GATHER:
            # the head's pre-backward: the root's all-gather buffer beside its copy, then, that buffer let go, the last
            # layer's all-gather prefetched beside the root
            return shard.root_weights + max(shard.root_weights, shard.top(1))
        if segment == LOWEST_LAYER_GATHER:  # its all-gather buffer beside its copy, every layer above gathered
            return shard.root_weights + sum(shard.layer_weights) + shard.layer_weights[0]
        layer_made = min(max(made - shard.head_gradients, 0), sum(shard.layer_gradients))
        if segment in LAYER_BACKWARD_STARTS.values():
            # a layer's pre-backward: the layers done, and its all-gather buffer beside its copy
            done = min(shard.layers_done(layer_made), shard.layers - 1)
            return shard.root_weights + shard.top(done) + 2 * shard.layer_weights[shard.layers - 1 - done]
        if layer_made == 0 and shard.head and segment == "head_bwd":
            return shard.root_weights + shard.top(1)  # the last layer's all-gather, prefetched at the head
        # In a layer's backward FSDP2 has gathered it and prefetched the next from its pre-backward on, before the
        # layer makes its first gradient (an MoE block's routing backward runs first)
        # The layers done, the one computing and the next one's all-gather buffer
        return shard.root_weights + shard.top(min(shard.layers_done(layer_made) + 2, shard.layers))

    def finalize(stage: int, resident: int) -> None:
        """FSDP2's post-backward of every group after the stage's last backward: a group's parameters resharded, its
        gradients copied into the reduce-scatter input, freed, and its 1/dp shard made; the layers last to first,
        the root last."""
        shard = shards[stage]
        unsharded = stage_gradients(stage)
        layers_gathered = shard.layers
        activations, temporary = beside()
        for index, group in enumerate([*reversed(shard.layer_gradients), shard.root_gradients]):
            if index == shard.layers and vocabulary_extra[stage]:
                # DTensor's whole-vocabulary embedding gradient: this rank's Shard(0) slice is cloned out of it first,
                # the root still gathered and the lowest layer's reduce-scatter input not yet let go
                previous_input = shard.layer_gradients[0] if shard.layers else 0
                moments.append((Moment(phase="backward", autocast_weights=0, gradients=resident + unsharded,
                                       activations=activations, temporary=temporary + previous_input + group),
                                shard.root_weights + gathered_elsewhere(stage)))
            if layers_gathered:
                layers_gathered -= 1
                gathered = shard.root_weights + sum(shard.layer_weights[:layers_gathered])
            else:
                gathered = 0
            moments.append((Moment(phase="backward", autocast_weights=0, gradients=resident + unsharded,
                                   activations=activations, temporary=temporary + group),
                            gathered + gathered_elsewhere(stage)))
            # the shard made, or (a later accumulation step) added in place to the one the steps before made
            unsharded += (group // shard.dp if stage not in carried and not shard.host else 0) - group
        reduced.add(stage)

    # Under FSDP2 each accumulation step ends as a step without accumulation does (every group resharded, its
    # gradients reduce-scattered): the next gathers and makes its unsharded gradients anew beside the shards so far.
    carried: dict[int, int] = {}  # FSDP2: each stage's gradient shards from the accumulation steps before
    for kind, stage, microbatch in _accumulated_schedule(config, rank):
        if kind == NEXT_STEP:  # the gradients stay; the step's losses, and the inputs their graphs keep, went
            kept = 0
            if shards is not None:
                # each group's 1/dp shard (DTensor's whole-vocabulary embedding gradient is reduce-scattered to the
                # rank's shard of its slice); none under CPUOffloadPolicy, which added them into the host's
                carried = {stage: 0 if shards[stage].host else
                           sum(group // shards[stage].dp for group in shards[stage].layer_gradients)
                           + shards[stage].root_gradients // shards[stage].dp for stage in reduced}
                for state in (done, reduced, previous, backwards):
                    state.clear()
            continue
        if kind in (RECV_F, RECV_B, SEND_F, SEND_B):
            buffers[(kind, stage, microbatch)] = hidden_states
            continue
        if kind == WAIT_SEND_F and outputs_kept:
            continue
        if kind in (WAIT_SEND_F, WAIT_SEND_B):
            del buffers[(SEND_F if kind == WAIT_SEND_F else SEND_B, stage, microbatch)]
            continue
        if kind not in (FORWARD, BACKWARD):
            continue
        program = programs[stage]
        resident = (sum(stage_gradients(other) for other in done if other != stage)
                    + sum(size for other, size in carried.items() if other not in reduced))
        if kind == FORWARD:
            buffers.pop((RECV_F, stage, microbatch), None)  # the program's received input from here on
            own = stage_gradients(stage) if stage in done else 0
            moments += [(moment_plus(moment, resident + own, *beside()),
                         forward_gathered(stage, segment) + gathered_elsewhere(stage))
                        for moment, segment in zip(program.forward, program.forward_segments)]
            in_flight[(stage, microbatch)] = program.held
            previous[stage] = FORWARD
            continue
        buffers.pop((RECV_B, stage, microbatch), None)  # the program's received output gradient from here on
        del in_flight[(stage, microbatch)]
        # A later backward holds the stage's gradients whole; each new one is among the candidate's temporaries
        # until AccumulateGrad adds it in place, as it is until the first backward makes it the gradient.
        backward = [(moment_plus(moment, resident + (stage_gradients(stage) if stage in done else moment.gradients),
                                 *beside()),
                     backward_gathered(stage, moment.gradients, segment) + gathered_elsewhere(stage))
                    for moment, segment in zip(program.backward, program.backward_segments)]
        extra = vocabulary_extra[stage]
        if extra and backward:  # the embedding's backward is the stage's last: a whole-vocabulary gradient made
            last_moment, gathered = backward[-1]
            backward[-1] = (last_moment._replace(temporary=last_moment.temporary + extra) if stage in done
                            else last_moment._replace(gradients=last_moment.gradients + extra)), gathered
        if ddp_whole and stage in done:
            # _pre_dp_module_transform makes the DTensor parameters in the first forward only (later forwards reuse
            # them): their from_local backward nodes are the oldest of every graph, and autograd runs them last, so
            # each new gradient waits in the engine's input buffer until the rest of backward is done, beside the
            # gradients accumulated so far (a first backward's become the gradients: the same bytes).
            backward = [(moment._replace(temporary=moment.temporary + made.gradients), gathered)
                        for (moment, gathered), made in zip(backward, program.backward)]
        if ddp_whole and stage == 0 and backward:  # the first stage: the embedding's
            last_moment, gathered = backward[-1]  # the program's: the slice made beside the output's gradient
            backward[-1] = last_moment._replace(temporary=last_moment.temporary - rank_slice + ddp_whole), gathered
            if stage not in done:  # the output's gradient goes, then the slice is cloned out as the gradient
                backward.append((last_moment._replace(gradients=last_moment.gradients + rank_slice,
                                                      temporary=beside()[1] + ddp_whole), gathered))
        if shards is not None and previous.get(stage) == FORWARD and shards[stage].reshard and not shards[stage].head:
            # ZeRO-3 resharded the root after the forward; a stage without the head starts its backward by gathering
            # it again: its all-gather buffer beside its gathered copy, the micro-batch's forward still whole (a last
            # stage gathers it after the loss's backward, where the head's new gradient, as large, follows it)
            activations, temporary = beside()
            start = Moment(phase="backward", autocast_weights=0,
                           gradients=resident + (stage_gradients(stage) if stage in done else 0),
                           activations=activations + program.held, temporary=temporary)
            backward.insert(0, (start, 2 * shards[stage].root_weights + gathered_elsewhere(stage)))
            shard = shards[stage]
            if shard.layers:
                # A stage without the head starts with its last layer's all-gather and copy-out (and the next
                # layer's all-gather, prefetched), then the root's all-gather beside its copy; the received output
                # gradient beside them
                received = hidden_states if stage not in last_stages else 0
                # with no root the last layer's all-gather buffer is still beside its copy where it is the only one
                layers = shard.top(2) + (shard.top(1) if shard.layers == 1 and not shard.root_weights else 0)
                backward.insert(1, (start._replace(temporary=temporary + received),
                                    2 * shard.root_weights + layers + gathered_elsewhere(stage)))
        moments += backward
        if outputs_kept:
            buffers.pop((SEND_F, stage, microbatch), None)  # the backward's end lets the kept output go
        done.add(stage)
        previous[stage] = BACKWARD
        backwards[stage] += 1
        if stage in last_stages:
            kept += hidden_states
        if shards is not None and backwards[stage] == config.microbatches:
            finalize(stage, resident)
    return moments


def moment_plus(moment: Moment, gradients: int, activations: int, temporary: int) -> Moment:
    return Moment(phase=moment.phase, autocast_weights=moment.autocast_weights, gradients=gradients,
                  activations=moment.activations + activations, temporary=moment.temporary + temporary)
