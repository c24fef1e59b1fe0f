"""The exact tracer: two training steps of the real architecture on fake tensors."""

from engine.trace.runner import TraceResult, trace

__all__ = ["TraceResult", "trace"]
