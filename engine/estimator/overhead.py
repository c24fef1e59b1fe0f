"""What the device holds beyond tensors: CUDA context, library workspaces, allocator slack.

Figures and their sources:
- CUDA context and kernels with lazy module loading (CUDA >= 11.7, the default since 11.8): about
  300-500 MiB on recent GPUs, over 1 GiB before (shared/reference/facts.md, "What the GPU really
  shows"); HF's "model memory anatomy" measured 1,343 MB on a V100 with eager loading. NVML counts it;
  the caching allocator does not (it is outside `max_memory_reserved`).
- cuBLAS and cuBLASLt workspaces: PyTorch allocates them through its caching allocator, so they are
  inside reserved (and allocated) memory. memtui counts two per training stream, each of the per-architecture
  size below (`cublas_workspace_bytes`). What PyTorch's source says (aten/src/ATen/cuda/CublasHandlePool.cpp,
  parseChosenWorkspaceSize): with CUBLAS_WORKSPACE_CONFIG unset, `4096 * 8 * 1024` bytes (32 MiB) on compute
  capability 9.x, 10.x and 12.x, `4096 * 1024 * 2 + 16 * 1024 * 8` (8,519,680 bytes) elsewhere, where memtui
  uses 12 MiB; and on recent main cuBLASLt shares that workspace (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on unless
  set to 0), which would make it one per stream, not two. The headers of the installed torch 2.15
  (ATen/cuda/CUDAContextLight.h) describe yet another default: per-operation workspaces unless ATen's
  workspace caching is enabled. Not changed here: the figures feed every tensor peak and the measured
  accuracy tables; a CUDA run of `memtui trace --device cuda` settles it.
- NCCL buffers, only with more than one GPU: NCCL_BUFFSIZE (default 4 MiB, NCCL's environment
  variables reference) per channel for each ring neighbour, sent and received, per communicator; memtui
  assumes NCCL's usual 8 channels (an assumption, not a measurement: NCCL picks the count from the
  topology) and one communicator per parallel dimension larger than 1 (data, tensor, pipeline).
  cudaMalloc'd by NCCL itself: outside reserved, inside NVML's used memory.
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


NCCL_BUFFSIZE = 4 * MiB  # NCCL's default (NCCL_BUFFSIZE)
NCCL_CHANNELS = 8  # assumed; NCCL chooses from the topology
NCCL_RING_PEERS = 2  # a ring's previous and next rank


def nccl_buffer_bytes(communicators: int) -> int:
    """NCCL's own buffers on one GPU for `communicators` process groups (0 on one GPU)."""
    return communicators * NCCL_CHANNELS * NCCL_RING_PEERS * NCCL_BUFFSIZE


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
