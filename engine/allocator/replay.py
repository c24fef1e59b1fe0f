"""Replay a sequence of allocations and frees through the allocator model: the reserved peak."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memtui.engine.allocator.caching import CachingAllocator, OutOfMemory
from memtui.engine.allocator.config import DEFAULT_CONFIG, AllocatorConfig

FREE = -1  # the size of a free event: (key, FREE)


@dataclass(frozen=True)
class ReplayResult:
    reserved_peak_bytes: int  # torch.cuda.max_memory_reserved
    allocated_peak_bytes: int  # torch.cuda.max_memory_allocated (block sizes, rounded)
    reserved_end_bytes: int
    allocated_end_bytes: int
    segments_end: int  # cudaMalloc'd segments held at the end (expandable segments count their mapped ranges)
    events: int
    oom_event: int | None  # index of the allocation that ran out of memory; the replay stops there
    device_allocs: int  # cudaMalloc / page-map calls
    device_frees: int

    @property
    def fragmentation_bytes(self) -> int:
        """Reserved but never usable at the peak: reserved peak minus allocated peak."""
        return self.reserved_peak_bytes - self.allocated_peak_bytes


def replay(
    events: Iterable[tuple[object, int] | tuple[object, int, int]],
    config: AllocatorConfig = DEFAULT_CONFIG,
    *,
    device_limit: int | None = None,
    device_total: int = 80 << 30,
) -> ReplayResult:
    """`events`: (key, size) with size > 0 an allocation of `size` requested bytes, FREE a free of key; a third
    item, where given, is the stream the allocation is made on (0 otherwise): each stream has pools of its own, and a
    block goes back to the pool of the stream that made it, whichever stream frees it.

    A free of a key never allocated (a trace that starts mid-run) is skipped.
    """
    allocator = CachingAllocator(config, device_limit=device_limit, device_total=device_total)
    live: dict = {}
    malloc = allocator.malloc
    free = allocator.free
    oom_event = None
    count = 0
    for index, event in enumerate(events):
        count = index + 1
        key, size = event[0], event[1]
        if size > 0:
            try:
                live[key] = malloc(size, event[2] if len(event) > 2 else 0)
            except OutOfMemory:
                oom_event = index
                break
        else:
            block = live.pop(key, None)
            if block is not None:
                free(block)
    return ReplayResult(
        reserved_peak_bytes=allocator.reserved_peak,
        allocated_peak_bytes=allocator.allocated_peak,
        reserved_end_bytes=allocator.reserved,
        allocated_end_bytes=allocator.allocated,
        segments_end=allocator.held_segments(),
        events=count,
        oom_event=oom_event,
        device_allocs=allocator.num_device_alloc,
        device_frees=allocator.num_device_free,
    )
