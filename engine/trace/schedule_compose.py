"""A 1F1B pipeline rank's log built from another rank's: the same actions in its own order.

Under Schedule1F1B every rank runs the forward and the backward of every micro-batch, in an order that depends on
its stage (torch.distributed.pipelining.schedules.Schedule1F1B._step_microbatches: min(n, pp - stage) forwards of
warm-up, then a backward and a forward in turn, then the remaining backwards). Two middle stages of as many layers
run the same module on the same shapes, so what one action allocates and frees depends on the action and on what
runs around it, not on the rank: the first rank's forward of a micro-batch after a forward and before a backward is
another rank's forward in the same place. `compose_log` cuts a traced rank's log into its actions (each from its
receive to the next action's, as trace_pipeline records them) and lays them out in the other rank's order, each
action taken from the traced one in the same place (its kind and the kinds of the two actions either side, first or
last micro-batch, step) nearest in micro-batch. Its references to another action's allocations move with it: what
the action just before made (the output whose send completes, the gradient sent) is the new action before's; the
stage's gathered parameters (FSDP2's, kept between actions) are those of the action that gathered them, found by
its place; any other (a forward's saved tensors, freed by its backward) is the micro-batch's at the same offset.
The pipeline only takes composed logs after one rank's composed log was its traced one, event by event
(memtui.engine.trace.pipeline), and traces every rank otherwise.
"""

from __future__ import annotations

from memtui.engine.trace.tracker import Allocation, Event, MemoryLog

__all__ = ["NotComposable", "compose_log", "one_f_one_b_order", "places"]


class NotComposable(Exception):
    """The traced rank's log does not hold what the other rank runs; the caller traces that rank."""


def one_f_one_b_order(microbatches: int, stages: int, stage: int) -> list[tuple[str, int]]:
    """The (kind, micro-batch) actions of Schedule1F1B._step_microbatches on stage `stage` of `stages`."""
    warmup = min(microbatches, stages - stage)
    order = [("F", index) for index in range(warmup)]
    forward, backward = warmup, 0
    while True:
        order.append(("B", backward))
        backward += 1
        if forward == microbatches:
            break
        order.append(("F", forward))
        forward += 1
    order += [("B", index) for index in range(backward, microbatches)]
    return order


# How many actions on each side make an action's place: what an action frees can depend on the one before the
# one before (a backward after a backward frees that one's receive buffer only where it did not free it itself,
# as the 1B1F loop's last does).
NEIGHBOURS = 2


def places(order: list[tuple[str, int]], microbatches: int) -> list[tuple]:
    """Each action's place: the kinds of the NEIGHBOURS actions before it, its own and the NEIGHBOURS after it
    (None past the ends), whether its micro-batch is the first or the last."""
    kinds = [None] * NEIGHBOURS + [kind for kind, _ in order] + [None] * NEIGHBOURS
    return [(*kinds[n:n + 2 * NEIGHBOURS + 1], index == 0, index == microbatches - 1)
            for n, (_kind, index) in enumerate(order)]


def _signature(alloc: Allocation) -> tuple:
    return (alloc.layer, alloc.nbytes, alloc.raw_bytes, alloc.phase, alloc.step, alloc.op, alloc.shape, alloc.dtype,
            alloc.module, alloc.category, alloc.host, alloc.stream)


def compose_log(log: MemoryLog, actions: list[tuple[int, int, str, int]], source: list[tuple[str, int]],
                target: list[tuple[str, int]], microbatches: int) -> MemoryLog:
    """The log of a rank running `target` from the log of one running `source` (both one_f_one_b_order's), whose
    trace recorded `actions`: (index of the action's first event, step, kind, micro-batch), in order. Raises
    NotComposable where the traced rank has no action in a place the other has, or a reference cannot be placed."""
    steps = sorted({step for _start, step, _kind, _index in actions})
    if [(kind, index) for _start, step, kind, index in actions] != source * len(steps):
        raise NotComposable("the traced actions are not the schedule's")
    optimizer = {step: index for index, step, phase in log.phase_marks if phase == "optimizer"}
    if set(optimizer) != set(steps):
        raise NotComposable("a step without its optimizer mark")
    # segments: (step, kind, micro-batch) -> (start, end) of its events
    segments: dict[tuple[int, str, int], tuple[int, int]] = {}
    for number, (start, step, kind, index) in enumerate(actions):
        following = actions[number + 1] if number + 1 < len(actions) else None
        end = following[0] if following is not None and following[1] == step else optimizer[step]
        if end < start:
            raise NotComposable("an action after its step's optimizer")
        segments[(step, kind, index)] = (start, end)
    home: dict[int, tuple] = {}  # alloc id -> (step, kind, micro-batch, signature, its place among those)
    for (step, kind, index), (start, end) in segments.items():
        counts: dict[tuple, int] = {}
        for event in log.events[start:end]:
            if event.delta > 0:
                signature = _signature(log.allocations[event.alloc_id])
                home[event.alloc_id] = (step, kind, index, signature, counts.get(signature, 0))
                counts[signature] = counts.get(signature, 0) + 1
    source_places = places(source, microbatches)
    by_place: dict[tuple, list[int]] = {}
    for (kind, index), place in zip(source, source_places):
        by_place.setdefault(place, []).append(index)

    marks: dict[int, list[tuple[int, str]]] = {}
    for index, step, phase in log.phase_marks:
        marks.setdefault(index, []).append((step, phase))
    new_log = MemoryLog(unified_bytes=log.unified_bytes, host_peak_bytes=log.host_peak_bytes,
                        stream_names=dict(log.stream_names))
    live: dict[tuple, int] = {}

    position = {action: number for number, action in enumerate(source)}
    target_places = places(target, microbatches)

    def emit(start: int, end: int, shift: int, with_end_marks: bool = False, at: tuple[int, int, int] | None = None) -> None:
        """Events [start, end) of the traced log, moved `shift` micro-batches; `at`: (the action's place in the
        traced order, in the composed one, its step)."""
        for number in range(start, end + (1 if with_end_marks else 0)):
            for step, phase in marks.get(number, ()):
                new_log.phase_marks.append((len(new_log.events), step, phase))
            if number == end:
                break
            event = log.events[number]
            place = home.get(event.alloc_id)
            if place is None:
                key: tuple = ("outside", event.alloc_id)
            else:
                step, kind, index, signature, count = place
                home_at = position[(kind, index)]
                if at is not None and step == at[2] and home_at == at[0] - 1:
                    # the action just before (the output it sent, the gradient it sent, the parameters it left
                    # gathered): the one just before here
                    if at[1] == 0 or target[at[1] - 1][0] != kind:
                        raise NotComposable("the action before is not of the same kind")
                    index = target[at[1] - 1][1]
                elif at is not None and step == at[2] and signature[9] == "weights" and home_at < at[0]:
                    # the stage's state (FSDP2's gathered parameters, kept between actions): made by the action
                    # that last gathered them, found by its place, as many such places back
                    back = source_places[home_at:at[0]].count(source_places[home_at])
                    found = [number for number in range(at[1] - 1, -1, -1)
                             if target_places[number] == source_places[home_at]]
                    if len(found) < back:
                        raise NotComposable("no action in the place of the one that made the stage's state")
                    kind, index = target[found[back - 1]]
                else:  # another micro-batch's (its forward's saved tensors): the same offset in micro-batches
                    index += shift
                if not 0 <= index < microbatches:
                    raise NotComposable("a reference to a micro-batch the step does not have")
                key = (step, kind, index, signature, count)
            if event.delta > 0:
                if key in live:
                    raise NotComposable("an allocation made twice")
                alloc = log.allocations[event.alloc_id]
                new_id = len(new_log.allocations)
                new_log.allocations[new_id] = Allocation(
                    alloc_id=new_id, nbytes=alloc.nbytes, raw_bytes=alloc.raw_bytes, phase=alloc.phase,
                    step=alloc.step, op=alloc.op, shape=alloc.shape, dtype=alloc.dtype, module=alloc.module,
                    category=alloc.category, host=alloc.host, layer=alloc.layer, stream=alloc.stream)
                live[key] = new_id
                new_log.events.append(Event(new_id, event.delta, event.layer))
            else:
                if key not in live:
                    raise NotComposable(f"a free of an allocation not made: {key}")
                new_log.events.append(Event(live.pop(key), event.delta, event.layer))

    outside_start = 0
    for step in steps:
        first = segments[(step, *source[0])][0]
        emit(outside_start, first, 0)
        for number, ((kind, index), place) in enumerate(zip(target, places(target, microbatches))):
            candidates = by_place.get(place)
            if not candidates:
                raise NotComposable(f"no traced action in the place of {kind}{index}")
            traced = min(candidates, key=lambda candidate: (abs(candidate - index), candidate))
            emit(*segments[(step, kind, traced)], index - traced, at=(position[(kind, traced)], number, step))
        outside_start = optimizer[step]
    emit(outside_start, len(log.events), 0, with_end_marks=True)
    return new_log
