"""What the device holds beyond tensors: CUDA context, library workspaces, allocator slack.

Figures: the CUDA context with lazy module loading (CUDA >= 11.7) costs about
300-500 MiB on recent GPUs (../shared/reference/facts.md); cuBLAS and cuBLASLt
keep workspaces allocated through PyTorch's caching allocator, so they show in
torch.cuda.max_memory_allocated as well as in NVML.
"""

from __future__ import annotations

from memtui.engine.model.specs import GpuSpec
from memtui.engine.units import MiB

# Measured on Hopper with CUDA 12 and lazy loading; older parts load fewer kernels.
_CONTEXT_BYTES_BY_MAJOR = {6: 300 * MiB, 7: 320 * MiB, 8: 400 * MiB, 9: 500 * MiB, 10: 560 * MiB, 12: 560 * MiB}

# cuBLAS workspace per handle: 32 MiB on Hopper (sm90+), 4 MiB + 8 MiB before (PyTorch's defaults),
# plus cuBLASLt's own workspace of the same size since PyTorch 2.3.
_CUBLAS_WORKSPACE_BY_MAJOR = {6: 12 * MiB, 7: 12 * MiB, 8: 12 * MiB, 9: 32 * MiB, 10: 32 * MiB, 12: 32 * MiB}


def cuda_context_bytes(gpu: GpuSpec) -> int:
    major = int(gpu.compute_capability.split(".")[0])
    return _CONTEXT_BYTES_BY_MAJOR.get(major, 500 * MiB)


def cublas_workspace_bytes(gpu: GpuSpec) -> int:
    major = int(gpu.compute_capability.split(".")[0])
    return 2 * _CUBLAS_WORKSPACE_BY_MAJOR.get(major, 32 * MiB)


def reserved_from_allocated(tensor_peak_bytes: int, largest_block_bytes: int) -> int:
    """The caching allocator's reserved peak given the allocated peak.

    Large blocks come from segments rounded to 2 MiB and blocks are not split
    when the remainder is under 1 MiB, so reserved runs ahead of allocated by
    roughly one segment of rounding per live large block plus the fragmentation
    of the pool a step cycles through. We model it as 2 MiB of rounding plus
    a fraction of the largest transient block, which is what stays cached and
    unusable for a differently sized request.
    """
    slack = 2 * MiB + min(largest_block_bytes // 8, 512 * MiB)
    return tensor_peak_bytes + slack
