"""Watch every allocation and free of a training step, with fake or real tensors.

A TorchDispatchMode sees every op's outputs; a new storage is an allocation
(rounded to 512 bytes, as CUDA's caching allocator does) and a weakref
finalizer on the storage is its free. Events are logged with the phase and op
that made them; categories are assigned afterwards by ownership (parameters,
their .grad, optimizer state) so a gradient allocated in backward is counted
as a gradient for its whole life.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memtui.engine.allocator.config import block_rounded as rounded  # CUDA's 512-byte blocks


@dataclass
class Allocation:
    alloc_id: int
    nbytes: int  # rounded to the allocator's block size
    raw_bytes: int
    phase: str
    step: int
    op: str
    shape: tuple[int, ...]
    dtype: str
    module: str
    category: str = ""  # set by ownership or by phase when the log is analysed
    host: bool = False  # a CPU-side tensor in a real CUDA run (e.g. optimizer step counters)
    layer: int | None = None  # with layer tagging: the decoder layer it belongs to (memtui.engine.trace.extend)
    stream: int = 0  # the stream current when it was made (0: the default stream; FSDP2's own streams 1, 2, ...)


@dataclass(slots=True)
class Event:
    alloc_id: int
    delta: int  # +nbytes on allocation, -nbytes on free
    layer: int | None = None  # with layer tagging: the decoder layer running when it happened (None: outside)


@dataclass
class MemoryLog:
    allocations: dict[int, Allocation] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    phase_marks: list[tuple[int, int, str]] = field(default_factory=list)  # (event index, step, phase)
    # CUDA unified memory (bitsandbytes' paged optimizer states): outside the caching allocator, so not events.
    unified_bytes: int = 0
    # What each stream an allocation was made on is (Allocation.stream): 0 is the default stream.
    stream_names: dict[int, str] = field(default_factory=lambda: {0: "default"})
    # Host memory the step makes (activation offloading's pinned copies): (event index, live host bytes) at each
    # change, and the most alive at once; not device events either.
    host_peak_bytes: int = 0


def local_tensor(tensor):
    """The tensor holding the bytes: a DTensor's (FSDP2's parameters, gradients and optimizer states) is
    this rank's local shard, allocated inside DTensor's own dispatch where a dispatch mode does not look."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


class MemoryTracker(TorchDispatchMode):
    """Log allocations; `track()` registers tensors created before the mode was entered."""

    def __init__(self) -> None:
        super().__init__()
        self.log = MemoryLog()
        self._by_storage: dict[int, int] = {}  # id(storage) -> alloc id, while alive
        self._next_id = 0
        self.phase = "setup"
        self.step = 0
        self.module = ""
        self._finalizers: list[weakref.finalize] = []
        self._released: set[int] = set()
        self._unified: set[int] = set()  # id(storage) of unified-memory tensors, while alive
        self._making_unified = False
        self._host: set[int] = set()  # id(storage) of host-memory tensors, while alive
        self._making_host = False
        self._making_states_host = False  # host storages holding model states (not activation offloading's)
        self._host_live = 0
        self._untracked = 0
        # Layer tagging (memtui.engine.trace.extend): the decoder layer running now, set by its hooks, and
        # whether allocations made outside every layer take the layer of the tensors they are made from.
        self.layer: int | None = None
        self.tag_layers = False
        # The layer what is allocated now belongs to where that is not the running one (FSDP2's all-gather of
        # the layer it prefetches); the events stay the running layer's.
        self.owner: int | None = None
        # The stream each allocation is made on, as the caching allocator keys its pools by it. The traces run on
        # the CPU device, whose torch.cpu.stream() context FSDP2 enters for its all-gathers and reduce-scatters
        # exactly where it enters torch.cuda.stream() on a GPU, and torch.cpu.current_stream() follows it.
        self._streams: dict[int, tuple[int, object]] = {}  # id(stream object) -> (number, the object kept alive)
        self._stream_number(torch.cpu.current_stream())  # the default stream is 0

    # ---- phases -------------------------------------------------------------
    def mark(self, phase: str) -> None:
        self.phase = phase
        self.layer = None  # a phase starts outside the decoder layers
        self.log.phase_marks.append((len(self.log.events), self.step, phase))

    # ---- allocations ----------------------------------------------------------
    def unified_memory(self) -> contextlib.AbstractContextManager[None]:
        """Storages made inside are CUDA unified memory (cudaMallocManaged: bitsandbytes' paged optimizer
        states), which the caching allocator never sees: counted in `log.unified_bytes`, never as events."""
        return self._flag_inside("_making_unified")

    def host_memory(self) -> contextlib.AbstractContextManager[None]:
        """Storages made inside are host memory (activation offloading's pinned copies), not the device's:
        counted in `log.host_peak_bytes`, never as events."""
        return self._flag_inside("_making_host")

    @contextlib.contextmanager
    def _flag_inside(self, attribute: str) -> Iterator[None]:
        """`attribute` True inside the block, back to what it was after (the blocks nest)."""
        previous = getattr(self, attribute)
        setattr(self, attribute, True)
        try:
            yield
        finally:
            setattr(self, attribute, previous)

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Ops inside make no allocations of the step: --compile's fused intermediates, which inductor never
        allocates, and the fake tensors AOTAutograd's tracing makes."""
        self._untracked += 1
        try:
            yield
        finally:
            self._untracked -= 1

    def model_states_on_host(self) -> contextlib.AbstractContextManager[None]:
        """Storages made inside are host memory that holds model states (FSDP2's CPU offload: the shards, their
        gradients, the optimizer's states and step): never events, and not in `log.host_peak_bytes`, which is
        activation offloading's."""
        return self._flag_inside("_making_states_host")

    def mark_host(self, tensor: torch.Tensor) -> None:
        """`tensor`'s storage, made before the tracker watched, holds model states on the host (as
        model_states_on_host)."""
        with self.model_states_on_host():
            self._track_host(local_tensor(tensor).untyped_storage())

    def _track_host(self, storage) -> None:
        key = id(storage)
        if key in self._host or key in self._by_storage:
            return
        self._host.add(key)
        if self._making_states_host:
            self._finalizers.append(weakref.finalize(storage, self._host.discard, key))
            return
        self._host_live += storage.nbytes()
        self.log.host_peak_bytes = max(self.log.host_peak_bytes, self._host_live)
        self._finalizers.append(weakref.finalize(storage, self._host_freed, key, storage.nbytes()))

    def _host_freed(self, key: int, nbytes: int) -> None:
        self._host.discard(key)
        self._host_live -= nbytes

    def _track_unified(self, storage) -> None:
        key = id(storage)
        if key in self._unified or key in self._by_storage:
            return
        self._unified.add(key)
        self.log.unified_bytes += storage.nbytes()
        self._finalizers.append(weakref.finalize(storage, self._unified.discard, key))

    def track(self, tensor: torch.Tensor, op: str = "external", layer: int | None = None) -> int | None:
        """Log `tensor`'s storage as an allocation if it is new; its alloc id. `layer`: the decoder layer it
        belongs to when no layer is running (layer tagging)."""
        tensor = local_tensor(tensor)
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        key = id(storage)
        if self._making_unified:
            self._track_unified(storage)
            return None
        if self._making_host or self._making_states_host:
            self._track_host(storage)
            return None
        if key in self._unified or key in self._host:  # an in-place op on a unified-memory or host tensor
            return None
        existing = self._by_storage.get(key)
        if existing is not None:
            return existing
        raw = storage.nbytes()
        if raw == 0:
            return None
        alloc_id = self._next_id
        self._next_id += 1
        nbytes = rounded(raw)
        self.log.allocations[alloc_id] = Allocation(
            alloc_id=alloc_id, nbytes=nbytes, raw_bytes=raw, phase=self.phase, step=self.step, op=op,
            shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."), module=self.module,
            layer=self.owner if self.owner is not None else self.layer if self.layer is not None else layer, stream=self._stream_number(torch.cpu.current_stream()),
        )
        self.log.events.append(Event(alloc_id, nbytes, self.layer))
        self._by_storage[key] = alloc_id
        self._finalizers.append(weakref.finalize(storage, self._freed, key, alloc_id, nbytes))
        return alloc_id

    def name_stream(self, stream: object, name: str) -> None:
        """Say what `stream` is (FSDP2's all-gather stream...), if allocations were made on it."""
        known = self._streams.get(id(stream))
        if known is not None:
            self.log.stream_names[known[0]] = name

    def _stream_number(self, stream: object) -> int:
        known = self._streams.get(id(stream))
        if known is None:
            known = self._streams[id(stream)] = (len(self._streams), stream)
        return known[0]

    def _freed(self, key: int, alloc_id: int, nbytes: int) -> bool:
        """Log a free once (a storage shrunk in place and later collected reports twice); True if logged."""
        if alloc_id in self._released:
            return False
        self._released.add(alloc_id)
        if self._by_storage.get(key) == alloc_id:
            del self._by_storage[key]
        self.log.events.append(Event(alloc_id, -nbytes, self.layer))
        return True

    def storage_resized(self, tensor: torch.Tensor, op: str = "resize_storage") -> None:
        """A storage freed or re-allocated in place (`untyped_storage().resize_`), which no dispatch shows.

        FSDP2 frees each unsharded parameter this way after use and grows it again at the next all-gather.
        """
        storage = tensor.untyped_storage()
        key = id(storage)
        existing = self._by_storage.get(key)
        if existing is not None and storage.nbytes() != self.log.allocations[existing].raw_bytes:
            self._freed(key, existing, self.log.allocations[existing].nbytes)
        if storage.nbytes() > 0:
            self.track(tensor, op)

    def alloc_id_of(self, tensor: torch.Tensor) -> int | None:
        return self._by_storage.get(id(local_tensor(tensor).untyped_storage()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            # `.item()` on a fake tensor has no value (Adafactor reads norms and steps this way): any
            # number will do, since no allocation the step makes depends on it.
            return _placeholder_scalar(args[0].dtype)
        out = func(*args, **(kwargs or {}))
        if self._untracked:
            return out
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if self.tag_layers and self.layer is None:
            self._track_with_owners(name, args, kwargs, out)
            return out
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value, op=name)
        return out

    def _layer_of(self, value) -> int | None:
        if not isinstance(value, torch.Tensor):
            return None
        alloc_id = self._by_storage.get(id(local_tensor(value).untyped_storage()))
        return None if alloc_id is None else self.log.allocations[alloc_id].layer

    def _track_with_owners(self, name: str, args, kwargs, out) -> None:
        """Outside the layers (the optimizer, zero_grad): an output belongs to the layer of what it is made
        from, position by position for the lists a foreach op takes and returns."""
        if isinstance(out, (list, tuple)) and out and all(isinstance(value, torch.Tensor) for value in out):
            lists = [arg for arg in args if isinstance(arg, (list, tuple)) and len(arg) == len(out)]
            if lists:
                for position, value in enumerate(out):
                    owner = next((layer for items in lists if (layer := self._layer_of(items[position])) is not None),
                                 None)
                    self.track(value, op=name, layer=owner)
                return
        owner = next((layer for value in tree_flatten((args, kwargs or {}))[0]
                      if (layer := self._layer_of(value)) is not None), None)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value, op=name, layer=owner)

    def detach_finalizers(self) -> None:
        """Stop recording frees (tensors that outlive the trace are not events of it)."""
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()


def _is_fake(tensor: object) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _placeholder_scalar(dtype: torch.dtype) -> bool | int | float:
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point or dtype.is_complex else 1


def classify(log: MemoryLog, *, weights: set[int], gradients: set[int], optimizer: set[int], host: set[int]) -> None:
    """Assign each allocation its category: ownership first, then the phase it was made in."""
    for alloc in log.allocations.values():
        if alloc.alloc_id in host:
            alloc.host = True
        if alloc.alloc_id in weights:
            alloc.category = "weights"
        elif alloc.alloc_id in gradients:
            alloc.category = "gradients"
        elif alloc.alloc_id in optimizer:
            alloc.category = "optimizer_states"
        elif alloc.phase in ("forward", "loss", "inputs"):
            alloc.category = "activations"
        elif alloc.phase == "setup":
            alloc.category = "weights"
        else:
            alloc.category = "temporary"
