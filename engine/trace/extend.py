"""A model of L decoder layers traced at a few layers: the allocation log of L layers built from the log of k.

Every layer between the first and the last runs the same ops on tensors of the same shapes, so the log of a
deeper model is the log of a shallow one with the events of one middle layer (the template) repeated. The
tracker tags each event with the decoder layer running when it happened (hooks around each layer's forward,
tensor hooks at the layers' boundaries in backward) and each allocation with its layer: the running one, or
outside every layer (the optimizer, zero_grad, the weights) its owner's (a parameter, its gradient, its
optimizer states) or that of the tensors it was made from, position by position for a foreach op's lists.

`extend_log` cuts the log into runs of events of one layer and repeats each run of the template for every
layer added, in the order the run's neighbours show (first to last in forward and in the optimizer's lists,
last to first in backward). An event refers to an allocation of its own layer or of a neighbour by the
allocation's place among its layer's allocations, so a repeated free frees the same tensor of the repeated
layer. The runner only takes a log built this way after the same construction has rebuilt the log of k + 1
layers from the log of k exactly, event by event (memtui.engine.trace.runner), and traces every layer when not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from memtui.engine.trace.tracker import Allocation, Event, MemoryLog, MemoryTracker

# Layers traced: the template's neighbours on both sides are middle layers too (the first and the last layer
# may differ, e.g. the first one's input needs no gradient when the embedding is frozen).
TRACED_LAYERS = 5
TEMPLATE = 2
# Families whose decoder layers are all alike (a per-layer list in the config is checked too).
UNIFORM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def extension_refusal(spec, config) -> str | None:
    """Why this configuration is traced at every layer, or None when a few layers and the extension will do (the
    runner still checks that the log of six layers rebuilt from five is the traced one)."""
    if config.pp > 1:
        return "pipeline-parallel programs are traced at every layer"
    if config.dp > 1 and config.zero <= 1 and config.tp == 1:  # ZeRO-1 runs under DDP too
        return "DDP's gradient buckets fill by bytes, not layer by layer: traced at every layer"
    if spec.num_layers <= TRACED_LAYERS + 1:
        return "a model this shallow is traced at every layer"
    return layers_refusal(spec, config)


def layers_refusal(spec, config) -> str | None:
    """Why the model's decoder layers are not all alike, or the program not one the extension takes; None if they
    are (the pipeline's stages check the same: memtui.engine.trace.pipeline)."""
    if spec.family not in UNIFORM_FAMILIES:
        return f"the {spec.family} family is traced at every layer"
    uneven = [name for name, value in spec.config.items()
              if isinstance(value, list) and len(value) == spec.num_layers and len({repr(v) for v in value}) > 1]
    if uneven or spec.config.get("use_sliding_window"):
        return "layers that differ from each other are traced at every layer"
    if config.compile or config.activation_offload or config.optimizer in ("paged-adamw-8bit", "paged-adamw"):
        return "torch.compile, activation offloading and paged optimizers are traced at every layer"
    return None


# ---- tagging while tracing ----------------------------------------------------------------------------------
@contextlib.contextmanager
def layer_tagging(tracker: MemoryTracker, layers) -> Iterator[None]:
    """Tag the tracker's events with the decoder layer running: a forward pre-hook and hook on each layer (a layer
    runs until the next starts or the phase changes; a call inside another layer restores it), and in backward a tensor hook on
    each layer's input and on the last layer's output: the gradient of a layer's output arriving is the start of
    that layer's backward."""
    count = len(layers)
    running: list[int] = []  # the layers whose forward is running, innermost last
    handles = []

    def enter(index: int):
        def hook(_module, args, kwargs):
            running.append(index)
            tracker.layer = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if tracker.phase == "forward" and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                below = index - 1 if index > 0 else None
                hidden.register_hook(lambda _grad: _set_layer(tracker, below))
        return hook

    def leave(index: int):
        def hook(_module, _args, output):
            # Back to what ran before; from the top-level forward the layer goes on until the next one starts
            # (the model's loop frees the previous hidden states there) or the phase changes.
            if running:
                running.pop()
            tracker.layer = running[-1] if running else index
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if (index == count - 1 and tracker.phase == "forward" and isinstance(hidden, torch.Tensor)
                    and hidden.requires_grad):
                hidden.register_hook(lambda _grad: _set_layer(tracker, index))
        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave(index)))
    tracker.tag_layers = True
    try:
        yield
    finally:
        tracker.tag_layers = False
        for handle in handles:
            handle.remove()


def _set_layer(tracker: MemoryTracker, layer: int | None) -> None:
    tracker.layer = layer


def parameter_layers(layers) -> dict[int, int]:
    """id(parameter or buffer) -> index of the decoder layer holding it."""
    return {id(tensor): index for index, layer in enumerate(layers)
            for tensor in [*layer.parameters(), *layer.buffers()]}


def tag_owned(log: MemoryLog, owned: dict[int, int | None]) -> None:
    """Give allocations whose owner is known (alloc id -> layer) their owner's layer."""
    for alloc_id, layer in owned.items():
        if layer is not None and alloc_id in log.allocations:
            log.allocations[alloc_id].layer = layer


# ---- the extension ---------------------------------------------------------------------------------------------
class NotExtensible(Exception):
    """The log does not have the shape the extension assumes; the caller traces every layer."""


def _event_layer(event: Event, allocations: dict[int, Allocation]) -> int | None:
    return event.layer if event.layer is not None else allocations[event.alloc_id].layer


def extend_log(log: MemoryLog, traced: int, layers: int, template: int = TEMPLATE) -> MemoryLog:
    """The log of `layers` decoder layers from the log of `traced` (tagged), with `layers - traced` copies of
    layer `template`. Raises NotExtensible when a run's order or a reference cannot be placed."""
    added = layers - traced
    if added < 0 or not 0 < template < traced - 1:
        raise NotExtensible(f"cannot extend {traced} layers to {layers} from layer {template}")
    allocations = log.allocations
    # alloc id -> its role in its layer: its signature and its place among its layer's allocations of that
    # signature. A stage's outer layers may allocate more or less of something than the template (FSDP2 keeps the
    # stage's last layer gathered after forward): the rest of their allocations keep the template's roles.
    roles: dict[int, tuple] = {}
    per_layer: dict[tuple, int] = {}
    for alloc_id in sorted(allocations):
        alloc = allocations[alloc_id]
        if alloc.layer is not None:
            kind = (alloc.layer, _signature(alloc))
            roles[alloc_id] = (kind[1], per_layer.get(kind, 0))
            per_layer[kind] = roles[alloc_id][1] + 1

    events = _frees_by_layer(log.events, allocations)
    tags = [_event_layer(event, allocations) for event in events]
    runs: list[tuple[int, int, int | None]] = []  # (start, end, layer)
    for index, tag in enumerate(tags):
        if runs and runs[-1][2] == tag and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1, tag)
        else:
            runs.append((index, index + 1, tag))

    def shifted(layer: int) -> int:  # a traced layer's index among `layers`
        return layer if layer <= template else layer + added

    by_role: dict[tuple[int, tuple], Allocation] = {(allocations[a].layer, role): allocations[a] for a, role in roles.items()}
    new_ids: dict[tuple, int] = {}
    new_log = MemoryLog(unified_bytes=log.unified_bytes, host_peak_bytes=log.host_peak_bytes,
                        stream_names=dict(log.stream_names))
    new_index: list[int] = []  # traced event index -> index of its first copy in the new log

    def emit(event: Event, tag: int | None, at: int | None) -> None:
        """Append `event` (of traced layer `tag`) as it happens in the new log's layer `at` (None: outside)."""
        alloc = allocations[event.alloc_id]
        if alloc.layer is None:
            key: tuple = ("untagged", event.alloc_id)
            source = alloc
        else:
            offset = alloc.layer - tag
            # A neighbour's (the hidden states passed on) is the neighbour's in the new log too; one further off
            # is the first or the last layer's, wherever the event is.
            target = at + offset if abs(offset) <= 1 else shifted(alloc.layer)
            role = roles[event.alloc_id]
            key = ("layer", target, role)
            traced_layer = target if target <= template else max(template, target - added)
            source = by_role.get((traced_layer, role))
            if source is None:
                raise NotExtensible(f"no allocation {role} in layer {traced_layer}")
        if event.delta > 0:
            if key in new_ids:
                raise NotExtensible("an allocation made twice")
            new_id = len(new_log.allocations)
            new_ids[key] = new_id
            new_log.allocations[new_id] = Allocation(
                alloc_id=new_id, nbytes=source.nbytes, raw_bytes=source.raw_bytes, phase=source.phase,
                step=source.step, op=source.op, shape=source.shape, dtype=source.dtype, module=source.module,
                category=source.category, host=source.host, stream=source.stream)
            new_log.events.append(Event(new_id, source.nbytes))
        else:
            if key not in new_ids:
                raise NotExtensible(f"a free of an allocation not made: {key} (layer {tag} at {at})")
            new_id = new_ids.pop(key)
            new_log.events.append(Event(new_id, -new_log.allocations[new_id].nbytes))

    marked = {index for index, _step, _phase in log.phase_marks}
    for number, (start, end, tag) in enumerate(runs):
        if tag == template and added:
            if any(start < index < end for index in marked):
                raise NotExtensible("a phase starts inside a run of the template layer")
            before = next((runs[n][2] for n in range(number - 1, -1, -1) if runs[n][2] not in (None, template)), None)
            after = next((runs[n][2] for n in range(number + 1, len(runs)) if runs[n][2] not in (None, template)), None)
            rising = (before is not None and before < template) or (after is not None and after > template)
            falling = (before is not None and before > template) or (after is not None and after < template)
            if rising == falling:
                raise NotExtensible("a run of the template layer with no order to follow")
            copies = list(range(template, template + added + 1))
            order: list[int | None] = copies if rising else copies[::-1]
        else:
            order = [shifted(tag) if tag is not None else None]
        for copy, at in enumerate(order):
            for index in range(start, end):
                if copy == 0:
                    new_index.append(len(new_log.events))
                emit(events[index], tag, at)
    new_index.append(len(new_log.events))
    new_log.phase_marks = [(new_index[index], step, phase) for index, step, phase in log.phase_marks]
    return new_log


def _frees_by_layer(events: list[Event], allocations: dict[int, Allocation]) -> list[Event]:
    """The events with each burst of frees (frees in one layer's time with no allocation between) ordered by the
    layer of what they free. The order inside
    a burst is not the program's: autocast's cache of cast weights, cleared as the forward ends, frees them in
    its hash map's order, which changes from run to run; no figure of a trace depends on it."""
    ordered: list[Event] = []
    burst: list[Event] = []

    def flush() -> None:
        burst.sort(key=lambda event: (-1 if (layer := allocations[event.alloc_id].layer) is None else layer,
                                      event.alloc_id))
        ordered.extend(burst)
        burst.clear()

    for event in events:
        if event.delta < 0 and (not burst or burst[-1].layer == event.layer):
            burst.append(event)
            continue
        flush()
        if event.delta < 0:
            burst.append(event)
        else:
            ordered.append(event)
    flush()
    return ordered


def same_log(first: MemoryLog, second: MemoryLog) -> bool:
    """Whether two logs are the same events on allocations alike, up to the allocations' numbering and the order
    of the frees inside a burst of frees (see _frees_by_layer)."""
    if (len(first.events) != len(second.events) or first.phase_marks != second.phase_marks
            or first.unified_bytes != second.unified_bytes or first.host_peak_bytes != second.host_peak_bytes):
        return False
    numbering: dict[int, int] = {}
    mine_freed: set[int] = set()
    theirs_freed: set[int] = set()
    for mine, theirs in zip(first.events, second.events):
        if (mine.delta > 0) != (theirs.delta > 0):
            return False
        if mine.delta < 0:
            mine_freed.add(numbering.get(mine.alloc_id, -1))
            theirs_freed.add(theirs.alloc_id)
            continue
        if mine_freed != theirs_freed or mine.delta != theirs.delta:
            return False
        mine_freed.clear()
        theirs_freed.clear()
        if numbering.setdefault(mine.alloc_id, theirs.alloc_id) != theirs.alloc_id:
            return False
        if _signature(first.allocations[mine.alloc_id]) != _signature(second.allocations[theirs.alloc_id]):
            return False
    return mine_freed == theirs_freed


def _signature(alloc: Allocation) -> tuple:
    return (alloc.nbytes, alloc.raw_bytes, alloc.phase, alloc.step, alloc.op, alloc.shape, alloc.dtype, alloc.module,
            alloc.category, alloc.host, alloc.stream)
