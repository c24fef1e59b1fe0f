"""Reserved memory from the estimator: its simulated step's allocations and frees through the allocator model.

The estimator's step program (memtui.engine.estimator.sim) knows every tensor the step allocates and frees,
in order. Here it becomes the sequence the CUDA caching allocator sees over a run, as `memtui trace` records
it: the weights in the model's parameter order (each LoRA adapter after its base weight), the batch, the
cuBLAS and cuBLASLt workspaces at the first matmul, then each step's forward and backward, the optimizer
step (its states made in the first, its temporaries) and zero_grad(set_to_none=True). The first step makes
the optimizer states; `steps` more follow it, so the default (1) replays the same two steps as the trace.
Steps of different lengths (`seq_lens`) are what fragments the cache.

Replayed: one GPU; one rank of DDP (its gradient buckets beside the one-GPU step:
memtui.engine.estimator.ddp_sequence); one rank of FSDP2 sharding a full fine-tune over the data-parallel ranks or
HSDP's shard group (ZeRO-2/3, each stream's allocations on its own: memtui.engine.estimator.fsdp_sequence);
unquantized weights, AdamW (foreach, fused, for-loop), SGD with and without momentum, one micro-batch, the
optimizer stepped after backward. Not replayed: ZeRO-1, FSDP2 with LoRA, tensor or pipeline parallelism,
offload. Elsewhere `replay_unsupported` says why and the budget keeps the published-slack model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from memtui.engine.allocator import DEFAULT_CONFIG, FREE, AllocatorConfig, replay
from memtui.engine.errors import InputError
from memtui.engine.estimator.ddp_sequence import rebuilt_buckets, trained_bytes
from memtui.engine.estimator.fsdp_sequence import Fsdp2Rank
from memtui.engine.estimator.overhead import cublas_workspace_bytes, cuda_context_bytes, nccl_buffer_bytes
from memtui.engine.estimator.sim.core import lf_eval, lf_values
from memtui.engine.estimator.sim.program import allocation_program, dims_for, options_for
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig
from memtui.engine.model.validation import check_config


@dataclass(frozen=True)
class ReservedReplay:
    reserved_peak_bytes: int  # torch.cuda.max_memory_reserved after the steps
    allocated_peak_bytes: int  # torch.cuda.max_memory_allocated (blocks as rounded by the allocator)
    fragmentation_bytes: int  # reserved peak - allocated peak: cached but not usable at the peak
    seq_lens: tuple[int, ...]  # every step replayed, the first (which makes the optimizer states) included
    events: int
    oom_event: int | None  # the allocation that found no memory on the GPU, if one did


MAX_STEPS = 64  # each step replayed costs about as much as the first
MAX_SEQ_LEN = 10_485_760  # --seq-len's own bound
_SEQ_LENS_ALLOWED = "a comma list of whole numbers from 1 (512,1024,2048) or uniform:MIN-MAX (uniform:256-2048)"
_UNIFORM = re.compile(r"uniform:(\d+)-(\d+)")
SEQ_LENS_SEED = 0  # uniform: the lengths drawn are the same on every run


def parse_steps(text: str | int) -> int:
    """--steps: how many steps follow the first (which makes the optimizer states), 1..MAX_STEPS."""
    try:
        steps = int(text)
    except ValueError:
        raise InputError("--steps", f"{text!r} is not a whole number", f"1..{MAX_STEPS}") from None
    if not 1 <= steps <= MAX_STEPS:
        raise InputError("--steps", f"must be 1..{MAX_STEPS}, got {steps}", f"1..{MAX_STEPS}")
    return steps


def parse_seq_lens(text: str, steps: int) -> tuple[int, ...]:
    """--seq-lens: the length of each of the `steps` + 1 steps replayed. A list is cycled through from the
    first step; uniform:MIN-MAX draws each step's length uniformly from MIN..MAX (seeded: reproducible)."""
    text = text.strip()
    match = _UNIFORM.fullmatch(text)
    if match:
        low, high = int(match.group(1)), int(match.group(2))
        if not 1 <= low <= high <= MAX_SEQ_LEN:
            raise InputError("--seq-lens", f"uniform:{low}-{high} needs 1 <= MIN <= MAX <= {MAX_SEQ_LEN:,}",
                             _SEQ_LENS_ALLOWED)
        draw = random.Random(SEQ_LENS_SEED)
        return tuple(draw.randint(low, high) for _ in range(steps + 1))
    lengths = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= MAX_SEQ_LEN:
            raise InputError("--seq-lens", f"{part!r} is not a sequence length from 1 to {MAX_SEQ_LEN:,}",
                             _SEQ_LENS_ALLOWED)
        lengths.append(int(part))
    return tuple(lengths[i % len(lengths)] for i in range(steps + 1))


def check_seq_lens(seq_lens: Sequence[int], config: TrainingConfig, model: ModelSpec, gpu: GpuSpec) -> None:
    """Every replayed length must be one the configuration could run (a model's learned positions bound it)."""
    for length in sorted(set(seq_lens)):
        try:
            check_config(config.model_copy(update={"seq_len": length}), model, gpu)
        except InputError as error:
            raise InputError("--seq-lens", f"{length} refused: {error.message}", error.allowed) from None


def replay_unsupported(config: TrainingConfig, model: ModelSpec | None = None) -> str | None:
    """Why the estimator's step cannot be replayed through the allocator for `config` (None: it can)."""
    if model is not None and model.family == "generic":
        return "a generic model's traced layers keep their sizes, not their allocation order"
    if config.activation_offload:
        return "activation offloading (its host copies and copies back are not in the sequence)"
    if config.tp > 1 or config.pp > 1:
        return "tensor or pipeline parallelism (the sequence replayed is one GPU's, unsharded)"
    if config.dp > 1 and not (follows_fsdp2(config) or follows_ddp(config)):
        return ("ZeRO-1, or FSDP2 with LoRA (the sequence replayed is one GPU's, unsharded: DDP and FSDP2 of a full "
                "fine-tune are replayed)")
    if config.offload != "none":
        return "CPU offload"
    if config.quant != "none":
        return f"{config.quant} weights (the quantization's own allocations are not modelled)"
    if config.grad_accum > 1 or config.optimizer_in_backward:
        return "gradient accumulation or the optimizer stepped in backward"
    if config.master_weights or config.precision == "16-mixed":
        return "fp32 master weights or the fp16 loss scaler"
    if config.optimizer not in ("adamw", "sgd", "sgd-momentum"):
        return f"the {config.optimizer} optimizer's step (AdamW and SGD are replayed)"
    return None


def follows_fsdp2(config: TrainingConfig) -> bool:
    """Whether the replay follows this configuration's data parallelism: FSDP2 sharding a full fine-tune across
    the data-parallel ranks, or HSDP's shard group (replicating across the groups allocates nothing more on a
    rank: memtui.engine.estimator.fsdp_sequence)."""
    return (config.zero >= 2 and config.dp > 1 and config.shard_ranks > 1 and config.tp == 1 and config.pp == 1
            and not config.uses_lora and config.quant == "none" and config.offload == "none")


def follows_ddp(config: TrainingConfig) -> bool:
    """Whether the replay follows this configuration's data parallelism: PyTorch DDP (ZeRO-0) over every rank,
    its buckets beside the one-GPU step (memtui.engine.estimator.ddp_sequence)."""
    return (config.zero == 0 and config.dp > 1 and config.tp == 1 and config.pp == 1 and config.quant == "none"
            and config.offload == "none")


def allocation_sequence(config: TrainingConfig, model: ModelSpec, workspace: int,
                        seq_lens: Sequence[int]) -> list[tuple[object, int] | tuple[object, int, int]]:
    """(key, bytes requested) for an allocation, (key, FREE) for a free, over len(seq_lens) steps; FSDP2's events
    carry a third item, their stream (the others are the default stream's)."""
    program = allocation_program(dims_for(model, config.tp), options_for(config, model), model.num_layers)
    constant = (1.0, 0.0, 0.0, 0.0, 0.0)
    weights = [int(lf_eval(size, constant)) for size, _trainable in program.parameters]
    fsdp = Fsdp2Rank(program, weights, ranks=config.shard_ranks, reshard_after_forward=config.zero >= 3,
                     gathered_bytes=config.compute_bytes if config.fsdp_casts else config.weight_bytes,
                     stored_bytes=config.weight_bytes, reduce_bytes=config.weight_bytes,
                     casts=config.fsdp_casts) if follows_fsdp2(config) else None
    ddp = follows_ddp(config)
    # model.parameters() order, each LoRA adapter after the weight it adapts (what model.to("cuda") moves in turn).
    sequence: list = fsdp.shards() if fsdp else [(("w", i), size) for i, size in enumerate(weights)]
    if ddp:  # DistributedDataParallel's one bucket of the first step, made as the model is wrapped
        sequence.append((("ddp", 0), trained_bytes(program, weights)))
    # What the optimizer steps, in order: each parameter with a gradient (FSDP2: its shard).
    stepped = [(i, fsdp.shard_bytes(i) if fsdp else weights[i]) for i, _index in program.gradients]
    step_sizes: dict[int, list[int]] = {}  # the step's allocation sizes, per sequence length
    for step, seq_len in enumerate(seq_lens):
        values = lf_values(config.batch_size * seq_len, seq_len)
        sizes = step_sizes.get(seq_len)
        if sizes is None:
            sizes = step_sizes[seq_len] = [FREE if size is None else int(lf_eval(size, values))
                                           for _index, size in program.events]
        sequence.append((("ids", step), int(lf_eval(program.input_ids, values))))
        if step > 0:
            sequence.append((("ids", step - 1), FREE))  # the previous batch goes once the next one is made
        else:
            sequence += [(("cublas", 0), workspace // 2), (("cublas", 1), workspace - workspace // 2)]
        if ddp and step == 1:  # the Reducer's rebuild, before the second forward
            sequence.append((("ddp", 0), FREE))
            sequence += [(("ddp", 1, number), size) for number, size in enumerate(rebuilt_buckets(program, weights))]
        base = step << 32  # this step's tensors: keys apart from every other step's
        if fsdp:
            fsdp.run_step(sequence, step, sizes)
        else:
            sequence += [(base + index, size) for (index, _lf), size in zip(program.events, sizes)]
            sequence += [(base + index, FREE) for index in program.leftover]
        _optimizer_step(sequence, config, stepped, step)
        # zero_grad
        sequence += fsdp.zero_grad(step) if fsdp else [(base + index, FREE) for _position, index in program.gradients]
    return sequence


def _optimizer_step(sequence: list, config: TrainingConfig, stepped: list[tuple[int, int]], step: int) -> None:
    """What optimizer.step() allocates and frees for the parameters `stepped` ((index, bytes), in order), as
    torch.optim runs it (states made lazily at the first step)."""
    impl = config.optimizer_impl
    if config.optimizer == "sgd":
        return
    if config.optimizer == "sgd-momentum":
        if step == 0:  # torch.clone(grad) (empty_like for fused) becomes each momentum buffer
            sequence += [(("state", i, 0), size) for i, size in stepped]
        return
    # AdamW: _init_group makes step (on the device only for fused), exp_avg, exp_avg_sq per parameter.
    if step == 0:
        for i, size in stepped:
            if impl == "fused":
                sequence.append((("state", i, "step"), 4))
            sequence += [(("state", i, 0), size), (("state", i, 1), size)]
    if impl == "foreach":
        # _multi_tensor_adamw: torch._foreach_sqrt(exp_avg_sqs) for the whole group, freed after addcdiv_.
        sequence += [(("sqrt", step, i), size) for i, size in stepped]
        sequence += [(("sqrt", step, i), FREE) for i, _size in stepped]
    elif impl == "for-loop":
        # _single_tensor_adamw: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps); the previous
        # parameter's denom is released when the name is bound again.
        previous = None
        for i, size in stepped:
            sequence += [(("sqrt", step, i), size), (("denom", step, i), size), (("sqrt", step, i), FREE)]
            if previous is not None:
                sequence.append((("denom", step, previous), FREE))
            previous = i
        if previous is not None:
            sequence.append((("denom", step, previous), FREE))


def _replay_key(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, workspace: int,
                alloc_config: AllocatorConfig, seq_lens: Sequence[int] | None, steps: int) -> tuple:
    lengths = tuple(seq_lens) if seq_lens else (config.seq_len,)
    plan = tuple(lengths[i % len(lengths)] for i in range(steps + 1))
    return (config, id(model), gpu.memory_bytes, workspace, alloc_config, plan)


def cached_replay(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, workspace: int,
                  alloc_config: AllocatorConfig = DEFAULT_CONFIG, seq_lens: Sequence[int] | None = None,
                  steps: int = 1) -> ReservedReplay | None:
    """replay_step's answer if it was replayed before, else None (without replaying)."""
    hit = _REPLAYS.get(_replay_key(config, model, gpu, workspace, alloc_config, seq_lens, steps))
    return hit[1] if hit is not None and hit[0] is model else None


def replay_step(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, workspace: int,
                alloc_config: AllocatorConfig = DEFAULT_CONFIG, seq_lens: Sequence[int] | None = None,
                steps: int = 1) -> ReservedReplay:
    """The reserved peak of the first step and `steps` more (lengths from `seq_lens`, cycled; default the
    configuration's sequence length)."""
    hit = cached_replay(config, model, gpu, workspace, alloc_config, seq_lens, steps)
    if hit is not None:
        return hit
    key = _replay_key(config, model, gpu, workspace, alloc_config, seq_lens, steps)
    plan = key[-1]
    if len(_REPLAYS) > 64:
        _REPLAYS.clear()
    sequence = allocation_sequence(config, model, workspace, plan)
    result = replay(sequence, alloc_config, device_total=gpu.memory_bytes)
    replayed = ReservedReplay(
        reserved_peak_bytes=result.reserved_peak_bytes,
        allocated_peak_bytes=result.allocated_peak_bytes,
        fragmentation_bytes=result.fragmentation_bytes,
        seq_lens=plan,
        events=result.events,
        oom_event=result.oom_event,
    )
    _REPLAYS[key] = (model, replayed)  # holding the model keeps its id from being reused
    return replayed


# Per option set, so that the planner, which asks again for every redraw, replays once.
_REPLAYS: dict[tuple, tuple[ModelSpec, ReservedReplay]] = {}


def communicators(config: TrainingConfig) -> int:
    """NCCL communicators one rank joins: one per parallel dimension larger than 1."""
    return sum(1 for ranks in (config.dp, config.tp, config.pp) if ranks > 1)


def with_reserved(budget: Budget, config: TrainingConfig, model: ModelSpec, gpu: GpuSpec, *,
                  alloc_config: AllocatorConfig = DEFAULT_CONFIG, seq_lens: Sequence[int] | None = None,
                  steps: int = 1) -> Budget:
    """`budget` with its reserved peak replayed through the allocator model, and the device peak that replay
    implies: reserved + CUDA context + NCCL buffers (cuBLAS workspaces are inside reserved), as
    `replayed_device_peak_bytes`. The verdict (device_peak_bytes, fits, headroom) stays on the estimate's device
    peak: the planner, fit and the ladder decide on it synchronously, and no CUDA run has yet checked the
    replay's fragmentation against max_memory_reserved (docs/validation.md), so one figure decides everywhere.
    Where the step cannot be replayed the budget is returned with a note saying why.

    The replay is unbounded (no device limit): near the capacity the real allocator would free its cache and
    retry before failing, so a configuration over by less than its fragmentation may still run.
    """
    reason = replay_unsupported(config, model)
    if reason is not None:
        note = f"reserved memory not replayed through the allocator model ({reason})"
        return budget.model_copy(update={"notes": [*budget.notes, note]})
    replayed = replay_step(config, model, gpu, cublas_workspace_bytes(gpu), alloc_config, seq_lens, steps)
    extras = {"cuda_context": cuda_context_bytes(gpu), "nccl": nccl_buffer_bytes(communicators(config))}
    return budget.model_copy(update={
        "reserved_peak_bytes": replayed.reserved_peak_bytes,
        "fragmentation_bytes": replayed.fragmentation_bytes,
        "replayed_seq_lens": list(replayed.seq_lens),
        "device_overhead": extras,
        "replayed_device_peak_bytes": replayed.reserved_peak_bytes + sum(extras.values()),
    })


def with_reserved_if_replayed(budget: Budget, config: TrainingConfig, model: ModelSpec, gpu: GpuSpec) -> Budget | None:
    """For the planner, which must draw at once: `budget` with the reserved peak if the replay is cached,
    with the note saying why where the step cannot be replayed, None while the replay is still to be run."""
    if replay_unsupported(config, model) is None and cached_replay(config, model, gpu,
                                                                   cublas_workspace_bytes(gpu)) is None:
        return None
    return with_reserved(budget, config, model, gpu)
