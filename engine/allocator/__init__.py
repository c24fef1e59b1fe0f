"""A model of PyTorch's CUDA caching allocator, to predict reserved memory from a sequence of allocations.

Pure Python, no torch: it runs wherever the estimator runs.
"""

from memtui.engine.allocator.caching import CachingAllocator, OutOfMemory
from memtui.engine.allocator.config import DEFAULT_CONFIG, AllocatorConfig, parse_alloc_conf
from memtui.engine.allocator.replay import FREE, ReplayResult, replay

__all__ = ["DEFAULT_CONFIG", "FREE", "AllocatorConfig", "CachingAllocator", "OutOfMemory", "ReplayResult",
           "parse_alloc_conf", "replay"]
