"""PyTorch DDP's gradient buckets as the CUDA caching allocator sees them on one rank.

DistributedDataParallel (its defaults: 25 MiB buckets, a 1 MiB first one, gradient_as_bucket_view=False) keeps
flat buckets the gradients are copied into and all-reduced in place; autograd's own gradients stay where they are.
Without find_unused_parameters the first step runs with one bucket over every trained parameter (made when the
model is wrapped); before the second step's forward the Reducer rebuilds them in the order the gradients became
ready in the first backward, closing a bucket once it reaches its limit (1 MiB for the first, 25 MiB after:
`_compute_bucket_assignment_by_size` in torch/csrc/distributed/c10d/reducer.cpp), and frees the first one.
Everything else a rank allocates is the one-GPU step's. Checked against `memtui trace --gpus N --zero 0`
(tests/test_reserved_data_parallel.py).
"""

from __future__ import annotations

from memtui.engine.estimator.sim.program import AllocationProgram

MiB = 1 << 20
FIRST_BUCKET_BYTES = 1 * MiB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_BYTES = 25 * MiB  # DDP's default bucket_cap_mb


def trained_bytes(program: AllocationProgram, weights: list[int]) -> int:
    """The one bucket of the first step: every trained parameter's gradient (each in its parameter's dtype;
    `weights`: each parameter's bytes)."""
    return sum(size for size, (_lf, trainable) in zip(weights, program.parameters) if trainable)


def rebuilt_buckets(program: AllocationProgram, weights: list[int]) -> list[int]:
    """The buckets' bytes after the rebuild, in the order they are made: the gradients in the order the first
    backward made them (a gradient's last allocation: a tied weight's is the sum of its uses)."""
    made_at = {index: position for position, (index, size) in enumerate(program.events) if size is not None}
    ready = sorted(program.gradients, key=lambda gradient: made_at.get(gradient[1], -1))
    buckets, filling, limit = [], 0, FIRST_BUCKET_BYTES
    for parameter, _index in ready:
        filling += weights[parameter]
        if filling >= limit:
            buckets.append(filling)
            filling, limit = 0, BUCKET_BYTES
    if filling:
        buckets.append(filling)
    return buckets
