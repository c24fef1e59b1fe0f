"""The exact tracer: two training steps of the real architecture on fake tensors."""

from memtui.engine.trace.result import TraceResult
from memtui.engine.trace.runner import trace

__all__ = ["TraceResult", "trace"]
