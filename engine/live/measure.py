"""What the worker measures with torch: live tensor bytes, device counters, the per-layer cost.

Imported only inside the worker (it imports torch).

On the CPU the measurement is the MemoryTracker the tracer uses, on real
tensors: every storage the step allocates and frees, rounded as CUDA's caching
allocator rounds, with running totals a sampler thread can read at any time.
Its log goes through the tracer's own analysis, so a CPU run and a trace of
the same configuration are measured the same way. On CUDA the allocator's own
counters are the measurement; the tracker, when on, adds the per-component split.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memtui.engine.trace.tracker import MemoryTracker, local_tensor


@contextlib.contextmanager
def cpu_flash_sdpa() -> Iterator[None]:
    """The tracer's CUDA-like SDPA (memtui.engine.trace.cuda_sdpa), for real CPU tensors.

    CPU's flash kernel refuses attention dropout; CUDA's replays the RNG in backward
    and saves no mask, so the step allocates the same without it. The kernel runs
    with dropout 0 (GPT-2's attn_pdrop): the memory is CUDA's, the numbers differ.
    """
    import torch.nn.functional as F

    from memtui.engine.trace import cuda_sdpa as cuda

    def without_dropout(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
        return cuda._flash_sdpa(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)

    with cuda.cuda_sdpa():  # restores torch's own SDPA on the way out
        F.scaled_dot_product_attention = without_dropout
        yield


def cpu_dropout() -> contextlib.AbstractContextManager:
    """Dropout allocating what CUDA's fused kernel does (a one-byte mask), as the tracer runs it."""
    try:
        from memtui.engine.trace.cuda_dropout import cuda_dropout
    except ImportError:  # a tracer without it: CPU dropout as it is
        return contextlib.nullcontext()
    return cuda_dropout()


class LiveTracker(MemoryTracker):
    """MemoryTracker with running live/peak totals and an optional OOM limit (CPU runs)."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.limit_bytes = limit_bytes
        self._window_peak = 0
        self._lock = threading.Lock()

    def track(self, tensor: torch.Tensor, op: str = "external", layer: int | None = None) -> int | None:
        events = len(self.log.events)
        alloc_id = super().track(tensor, op, layer)
        if len(self.log.events) > events:  # a new storage, not one seen before
            self._add(self.log.events[-1].delta)
            if self.limit_bytes is not None and self.live_bytes > self.limit_bytes:
                raise torch.OutOfMemoryError(
                    f"memtui: tensors would reach {self.live_bytes} bytes, over this run's limit of "
                    f"{self.limit_bytes} bytes ({op}, shape {tuple(tensor.shape)})"
                )
        return alloc_id

    def _freed(self, key: int, alloc_id: int, nbytes: int) -> bool:
        logged = super()._freed(key, alloc_id, nbytes)
        if logged:
            self._add(-nbytes)
        return logged

    def _add(self, delta: int) -> None:
        with self._lock:
            self.live_bytes += delta
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
            if self.live_bytes > self._window_peak:
                self._window_peak = self.live_bytes

    def take_window_peak(self) -> int:
        """The highest live bytes since the previous call (so a sampler misses no peak)."""
        with self._lock:
            peak, self._window_peak = self._window_peak, self.live_bytes
        return peak


class CudaCounters:
    """torch.cuda's allocator counters, with a windowed peak for the sampler."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last_peak = 0
        self.peak_seen = 0

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def read(self) -> dict[str, Any]:
        allocated = self.allocated()
        peak = int(torch.cuda.max_memory_allocated(self.device))
        reserved = int(torch.cuda.memory_reserved(self.device))
        # max_memory_allocated is monotone; a window's peak is visible only when it rose.
        window = peak if peak > self._last_peak else allocated
        self._last_peak = peak
        self.peak_seen = max(self.peak_seen, peak)
        return {"allocated": allocated, "allocated_peak": window, "reserved": reserved}


def decoder_layers(model: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The decoder layers: the ModuleList of `count` blocks (works through peft and FSDP wrappers)."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return best


class LayerProbe:
    """Live bytes kept by each decoder layer's forward (what it saves for backward), per step."""

    def __init__(self, layers: list[torch.nn.Module], live_bytes: Callable[[], int], phase: Callable[[], str]) -> None:
        self.live_bytes = live_bytes
        self.phase = phase
        self.step = 0
        self._entry: dict[int, int] = {}
        self.retained: dict[int, dict[int, int]] = {}  # step -> layer index -> bytes
        self._handles = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(index)))
            self._handles.append(layer.register_forward_hook(self._post(index)))

    def _pre(self, index: int):
        def hook(_module, _inputs):
            if self.phase() == "forward" and index not in self.retained.get(self.step, {}):
                self._entry[index] = self.live_bytes()

        return hook

    def _post(self, index: int):
        def hook(_module, _inputs, _output):
            if self.phase() == "forward" and index in self._entry:
                entry = self._entry.pop(index)
                self.retained.setdefault(self.step, {})[index] = self.live_bytes() - entry

        return hook

    def per_layer_bytes(self) -> int | None:
        """Median bytes a layer's forward keeps, in the last step that ran every layer's forward."""
        for step in sorted(self.retained, reverse=True):
            values = list(self.retained[step].values())
            if step >= 2 and values:
                return int(statistics.median(values))
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def layer_state_bytes(layer: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """Exact bytes one layer's parameters hold: weights, their gradients' size, optimizer states."""
    weights = gradients = states = 0
    seen: set[int] = set()
    for parameter in layer.parameters():
        tensor = local_tensor(parameter)  # FSDP2's DTensor: this rank's shard
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        weights += tensor.untyped_storage().nbytes()
        if parameter.requires_grad:
            gradients += tensor.numel() * tensor.element_size()
        state = getattr(optimizer, "state", {}).get(parameter, {}) if optimizer is not None else {}
        for value in state.values():
            value = local_tensor(value)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                states += value.untyped_storage().nbytes()
    return {"weights": weights, "gradients": gradients, "optimizer_states": states}
