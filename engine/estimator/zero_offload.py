"""DeepSpeed's ZeRO-Offload with ZeRO-1 and 2 (`--offload optimizer`, data parallelism alone or one GPU): what
DeepSpeedZeroOptimizer (deepspeed/runtime/zero/stage_1_and_2.py, DeepSpeed 0.19.6, commit edaa722) allocates on
the GPU, as memtui.engine.trace.zero_offload's stand-in traces it (the defaults of deepspeed/runtime/zero/config.py:
reduce_bucket_size 5e8 elements, contiguous gradients, overlap_comm off, reduce_scatter on; one parameter group).

The trainable parameters live in one flat buffer, padded to 2 x dp elements; temp_grad_buffer_for_gpu_offload
holds one largest parameter's worth for good. From the first gradient hook to backward's end the ipg bucket
(reduce_bucket_size elements of the parameters' dtype) takes the gradients (ZeRO-2: each as it is made; ZeRO-1:
all at backward's end, in the flat buffer's order). Each reduction of the bucket makes, one after the other, the
flattened copy of the partitions' slices (where there are several) and, for each gradient in rank 0's partition,
its fp64 norm (kept to the step), the overflow check's fp32 copy and masks, and its fp32 slice for the host.
With gradient accumulation ZeRO-1's bucket and whole gradients stay from the first micro-batch to the boundary's
reductions; ZeRO-2's earlier micro-batches reduce without the checks, a too-large gradient of rank 0's partition
left whole to backward's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from memtui.engine.allocator.config import K_MIN_BLOCK_SIZE
from memtui.engine.allocator.config import block_rounded as rounded
from memtui.engine.estimator.layout import trainable_tensor_numels
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import TrainingConfig

REDUCE_BUCKET_SIZE = 500_000_000  # deepspeed/runtime/zero/config.py: reduce_bucket_size (elements)
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: each partition's start 4-byte aligned, in 16-bit elements
ONE_ELEMENT = K_MIN_BLOCK_SIZE  # a one-element tensor (a norm, a flag), as the caching allocator rounds it


def flat_padding(elements: int, dp: int) -> int:
    """Elements flatten_dense_tensors_aligned adds to the trainable parameters' flat buffer."""
    alignment = NCCL_START_ALIGNMENT_FACTOR * dp
    return -elements % alignment


def partition_size(elements: int, dp: int) -> int:
    """Elements of each rank's partition of the padded flat buffer."""
    return (elements + flat_padding(elements, dp)) // dp


@dataclass(frozen=True)
class Reduction:
    """One reduce_ipg_grads: `trigger`, the index (in the order the gradients reach the bucket) of the gradient
    whose hook ran it (None: backward's end); `held`, gradients alive beside the bucket then (ZeRO-1: those not yet
    copied in, the triggering one's included; a gradient too large for the bucket until it is reduced); `norms`,
    the fp64 norms kept before it; `transient`, the most it allocates at once beyond them; `keeps`, before the
    accumulation boundary, a gradient too large for the bucket in rank 0's partition, left whole to backward's end."""

    trigger: int | None
    held: int
    norms: int
    transient: int
    keeps: int = 0


def _check_bytes(numel: int, elements: int, dtype_bytes: int) -> int:
    """copy_grads_in_partition's most at once for one gradient of `numel` whose partition slice is `elements`:
    the slice as fp64 (then its norm, kept), _has_inf_or_nan's fp32 copy (none of an fp32 gradient), isnan,
    isinf, logical_or and its fp32 copy, the slice cast to fp32 for the host (none if fp32); its own norm included."""
    check = 3 * rounded(numel) + rounded(4 * numel) + (rounded(4 * numel) if dtype_bytes != 4 else 0)
    cast = rounded(4 * elements) if dtype_bytes != 4 else 0
    return ONE_ELEMENT + max(rounded(8 * elements), check, cast)


def reductions(flat: list[int], dp: int, dtype_bytes: int, stage: int, boundary: bool = True) -> list[Reduction]:
    """The bucket's reductions over one backward, for trainable tensors of `flat` elements in the flat buffer's order
    (rank 0's partition is its first 1/dp). ZeRO-2 takes the gradients in backward's order (the flat order reversed:
    the head's first, the embedding's last), ZeRO-1 in the flat order at backward's end. Before the accumulation
    boundary (ZeRO-2's earlier micro-batches: ZeRO-1 reduces only at it) copy_grads_in_partition only accumulates
    each gradient of rank 0's partition on the host (through temp_grad_buffer_for_gpu_offload, in place): no norm,
    no overflow check, no fp32 copy, and the gradient is not cleared."""
    size = partition_size(sum(flat), dp)
    starts = _starts(flat)
    order = list(range(len(flat)))[::-1] if stage == 2 else list(range(len(flat)))
    result: list[Reduction] = []
    bucket: list[int] = []
    elements = 0
    extra: int | None = None
    norms = 0
    waiting = sum(rounded(numel * dtype_bytes) for numel in flat) if stage == 1 else 0  # ZeRO-1: all made
    kept = 0  # ZeRO-1: a gradient too large for the bucket, outside rank 0's partition, kept to backward's end

    def reduce(trigger: int | None) -> None:
        nonlocal bucket, elements, extra, norms, kept
        slices: list[list[int]] = []
        for index in bucket:
            numel = flat[index]
            # (partition, offset in the tensor) of every partition it reaches (average_tensor's rank_and_offsets)
            reached = [(rank, max(rank * size - starts[index], 0)) for rank in range(dp)
                       if starts[index] < (rank + 1) * size and starts[index] + numel > rank * size]
            for position, (rank, offset) in enumerate(reached):
                end = reached[position + 1][1] if position + 1 < len(reached) else numel
                if slices and slices[-1][0] == rank:
                    slices[-1][1] += end - offset
                else:
                    slices.append([rank, end - offset])
        transient, chunk, count = 0, 0, 0
        for _rank, numel in slices:  # allreduce_and_scatter: a flattened copy of each chunk of several slices
            chunk, count = chunk + numel, count + 1
            if chunk > REDUCE_BUCKET_SIZE:
                transient = max(transient, rounded(chunk * dtype_bytes) if count > 1 else 0)
                chunk, count = 0, 0
        if count:
            transient = max(transient, rounded(chunk * dtype_bytes) if count > 1 else 0)
        held = waiting + kept + (rounded(flat[extra] * dtype_bytes) if extra is not None else 0)
        before, keeps = norms, 0
        for index in bucket:
            if starts[index] < size and boundary:
                elements_in = min(flat[index], size - starts[index])
                transient = max(transient, norms - before + _check_bytes(flat[index], elements_in, dtype_bytes))
                norms += ONE_ELEMENT
            elif index == extra and (stage == 1 or starts[index] < size):
                keeps += rounded(flat[index] * dtype_bytes)  # the epilogue clears it
        result.append(Reduction(trigger, held, before, transient, keeps if not boundary else 0))
        kept += keeps
        bucket, elements, extra = [], 0, None

    for position, index in enumerate(order):
        numel = flat[index]
        if elements + numel > REDUCE_BUCKET_SIZE:
            reduce(position)
        if stage == 1:  # copied into the bucket, its own storage freed; too large a one is counted as `extra`
            waiting -= rounded(numel * dtype_bytes)
        if numel > REDUCE_BUCKET_SIZE:
            extra = index
        bucket.append(index)
        elements += numel
    reduce(None)
    return result


def flat_numels(config: TrainingConfig, model: ModelSpec) -> list[int]:
    """The trainable tensors' sizes in the order of model.parameters(), as DeepSpeed flattens them (one GPU's
    whole model): a full fine-tune's embeddings, each decoder layer's, the final norm, an untied head; LoRA's
    adapters layer by layer."""
    numels = trainable_tensor_numels(config, model)
    if config.uses_lora:  # each layer's adapters, in its modules' order
        return numels
    norms = [model.hidden_size] * (2 if model.norm == "layer" else 1)
    embeddings = 1 + (model.positions == "learned")
    head = 1 if model.head_params else 0
    layers = len(numels) - embeddings - head - len(norms)
    return numels[layers:layers + embeddings] + numels[:layers] + numels[layers + embeddings + head:] + \
        numels[layers + embeddings:layers + embeddings + head]


@dataclass(frozen=True)
class ZeroOffloadOnGpu:
    """DeepSpeed's ZeRO-Offload terms on rank 0's GPU."""

    stage: int
    padding: int  # bytes the flat buffer's alignment adds to the trainable weights
    offload_buffer: int  # temp_grad_buffer_for_gpu_offload, held for good
    bucket: int  # the ipg bucket, from the first gradient hook to backward's end
    norms: int  # every fp64 norm kept from its reduction to the step
    reductions: tuple[Reduction, ...]
    made_through: tuple[int, ...]  # ZeRO-2: gradient bytes made (in backward's order) through each index
    accumulating: tuple[Reduction, ...] = ()  # ZeRO-2, --grad-accum: a micro-batch's before the boundary
    gradients: int = 0  # every gradient whole (ZeRO-1 accumulates them in .grad until the boundary)
    scaled_loss: int = 0  # DeepSpeed's fp16 engine: the loss times the loss scale, held by backward's caller


def zero_offload_on_gpu(config: TrainingConfig, model: ModelSpec, dtype_bytes: int) -> ZeroOffloadOnGpu:
    flat = flat_numels(config, model)
    dp = config.dp
    found = reductions(flat, dp, dtype_bytes, config.zero)
    order = flat[::-1] if config.zero == 2 else flat
    made = list(accumulate(numel * dtype_bytes for numel in order))
    size = partition_size(sum(flat), dp)
    in_partition = sum(1 for start in _starts(flat) if start < size)
    return ZeroOffloadOnGpu(stage=config.zero, padding=flat_padding(sum(flat), dp) * dtype_bytes,
                            offload_buffer=rounded(max(flat) * dtype_bytes),
                            bucket=rounded(REDUCE_BUCKET_SIZE * dtype_bytes), norms=in_partition * ONE_ELEMENT,
                            reductions=tuple(found), made_through=tuple(made),
                            accumulating=tuple(reductions(flat, dp, dtype_bytes, 2, boundary=False))
                            if config.grad_accum > 1 and config.zero == 2 else (),
                            gradients=sum(rounded(numel * dtype_bytes) for numel in flat),
                            scaled_loss=ONE_ELEMENT if config.precision == "16-true" and dtype_bytes == 2 else 0)


def _starts(flat: list[int]) -> list[int]:
    return list(accumulate(flat[:-1], initial=0))
