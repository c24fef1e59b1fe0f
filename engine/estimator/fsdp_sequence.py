"""FSDP2's step on one rank as the CUDA caching allocator sees it: every allocation and free, on its stream.

The estimator's step program (memtui.engine.estimator.sim) is one GPU's, with every weight whole. FSDP2
(`fully_shard` on each decoder layer and on the model, as `memtui trace --gpus N --zero 2|3` runs it) changes
what is resident and when, at the points the program marks (AllocationProgram.places):

- the weights are 1/N shards; each group (a layer, or the root: embeddings, final norm, head) is all-gathered
  before it computes, into a flat buffer on the all-gather stream, then copied out into one unsharded tensor per
  parameter on the default stream. Where FSDP2 casts (`--fsdp-param-dtype compute`) the shards are first cast
  into a copy-in buffer on the all-gather stream. FSDP2 keeps the last forward all-gather's buffer until the next
  one (the root's post-forward lets the last go); in backward it frees each buffer once copied out, and
  prefetches the group below while the one above computes.
- ZeRO-3 reshards (frees the unsharded parameters) after each layer's forward and the root's; ZeRO-2 does not,
  so backward gathers nothing. Both reshard a group after its backward.
- after a group's backward its gradients are copied into one reduce-scatter input (default stream, the reduce
  dtype), freed at the next group's reduce-scatter or at backward's end; the sharded gradients are views of the
  reduce-scatter output, made on the reduce-scatter stream and freed by zero_grad.
- the optimizer steps the shards.

Checked against `memtui trace --gpus N` per stream (tests/test_reserved_data_parallel.py). Followed: data-parallel FSDP2 of
a full fine-tune (no tensor or pipeline parallelism, LoRA, quantization, offload, gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from memtui.engine.allocator import FREE
from memtui.engine.estimator.sim.core import lf_eval, lf_values
from memtui.engine.estimator.sim.program import AllocationProgram

DEFAULT, ALL_GATHER, REDUCE_SCATTER = 0, 1, 2  # the streams (their numbers only keep their pools apart)
ROOT = -1  # the root group's number; decoder layers are 0..L-1

Event = tuple[object, int, int]  # (key, bytes or FREE, stream)
StepOptimizer = Callable[[list, list[tuple[int, int]], int], None]


def fsdp2_sequence(program: AllocationProgram, *, ranks: int, reshard_after_forward: bool, gathered_bytes: int,
                   stored_bytes: int, reduce_bytes: int, casts: bool, tokens_of: Callable[[int], int],
                   seq_lens: Sequence[int], workspace: int, optimizer_step: StepOptimizer) -> list[Event]:
    """One rank's allocations over len(seq_lens) steps. `gathered_bytes`: bytes per element of a parameter as
    gathered (the program's parameters are in that dtype); `stored_bytes`: of a shard; `reduce_bytes`: of the
    reduce-scatter input and output; `tokens_of(seq_len)`: the micro-batch's tokens; `optimizer_step(sequence,
    [(parameter, bytes)], step)` appends optimizer.step()'s (key, bytes) events for the shards."""
    constant = (1.0, 0.0, 0.0, 0.0, 0.0)
    numels = [int(lf_eval(size, constant)) // gathered_bytes for size, _trainable in program.parameters]
    layers = program.layer_parameters
    group_of = [ROOT] * len(numels)
    for layer, (first, end) in enumerate(layers):
        group_of[first:end] = [layer] * (end - first)
    members: dict[int, list[int]] = {}
    for position, group in enumerate(group_of):
        members.setdefault(group, []).append(position)
    group_numel = {group: sum(numels[i] for i in positions) for group, positions in members.items()}
    gradient_of = dict(program.gradients)  # parameter position -> its gradient's tensor index
    gradients_of = {group: [gradient_of[i] for i in positions if i in gradient_of] for group, positions in members.items()}

    sequence: list[Event] = [(("w", i), numel * stored_bytes // ranks, DEFAULT) for i, numel in enumerate(numels)]
    step_sizes: dict[int, list[int]] = {}
    for step, seq_len in enumerate(seq_lens):
        values = lf_values(tokens_of(seq_len), seq_len)
        sizes = step_sizes.get(seq_len)
        if sizes is None:
            sizes = step_sizes[seq_len] = [FREE if size is None else int(lf_eval(size, values))
                                           for _index, size in program.events]
        sequence.append((("ids", step), int(lf_eval(program.input_ids, values)), DEFAULT))
        if step > 0:
            sequence.append((("ids", step - 1), FREE, DEFAULT))
        else:
            sequence += [(("cublas", 0), workspace // 2, DEFAULT), (("cublas", 1), workspace - workspace // 2, DEFAULT)]
        _Step(sequence, step, numels, members, group_numel, gradients_of, ranks=ranks,
              reshard_after_forward=reshard_after_forward, gathered_bytes=gathered_bytes, reduce_bytes=reduce_bytes,
              casts=casts).run(program, sizes, len(layers))
        stepped: list[tuple[int, int]] = []
        optimizer_step(stepped, [(i, numel * reduce_bytes // ranks) for i, numel in enumerate(numels)], step)
        sequence += [(key, size, DEFAULT) for key, size in stepped]
        sequence += [(("rs", step, group), FREE, REDUCE_SCATTER) for group in members]  # zero_grad: the views go
    return sequence


class _Step:
    """One step's forward and backward under FSDP2: the program's events, FSDP2's own between them."""

    def __init__(self, sequence: list[Event], step: int, numels: list[int], members: dict[int, list[int]],
                 group_numel: dict[int, int], gradients_of: dict[int, list[int]], *, ranks: int,
                 reshard_after_forward: bool, gathered_bytes: int, reduce_bytes: int, casts: bool) -> None:
        self.sequence, self.step, self.numels, self.members = sequence, step, numels, members
        self.group_numel, self.gradients_of, self.ranks = group_numel, gradients_of, ranks
        self.reshard, self.gathered_bytes, self.reduce_bytes, self.casts = (reshard_after_forward, gathered_bytes,
                                                                              reduce_bytes, casts)
        self.base = step << 32  # the program's tensors of this step: keys apart from every other step's
        self.buffers: dict[int, tuple] = {}  # each gathered group's all-gather output not yet freed
        self.held: int | None = None  # the group whose forward all-gather output is kept until the next
        self.reduce_input: tuple | None = None  # the last reduce-scatter's input, kept until the next
        self.gathers = 0

    def run(self, program: AllocationProgram, sizes: list[int], layers: int) -> None:
        sequence, base = self.sequence, self.base
        self._all_gather(ROOT, hold=True)  # the root's pre-forward
        self._copy_out(ROOT, "fwd")
        place: tuple[int, str] = (-1, "inputs")
        in_backward = False
        for (index, _size), size, next_place in zip(program.events, sizes, program.places):
            if next_place != place:
                in_backward = self._cross(place, next_place, in_backward, layers)
                place = next_place
            sequence.append((base + index, size, DEFAULT))
        self._cross(place, (-1, "end"), in_backward, layers)
        sequence += [(base + index, FREE, DEFAULT) for index in program.leftover]
        if self.reduce_input is not None:  # the final callback waits for the last reduce-scatter, then lets go
            sequence.append((self.reduce_input, FREE, DEFAULT))

    def _cross(self, place: tuple[int, str], next_place: tuple[int, str], in_backward: bool, layers: int) -> bool:
        """FSDP2's hooks between two places of the program; whether backward has begun after them."""
        layer, phase = place
        next_layer, next_phase = next_place
        if layer >= 0 and phase == "fwd" and self.reshard:
            self._reshard(layer, "fwd")  # post-forward
        if layer >= 0 and phase == "bwd" or phase == "embed_bwd":
            self._post_backward(layer if layer >= 0 else ROOT)
        if phase in _HEAD_AND_LOSS and next_phase not in _HEAD_AND_LOSS:
            self._root_post_forward()  # the model's forward (its loss included) has returned
        starts_backward = not in_backward and next_phase.endswith("bwd")
        if starts_backward and self.reshard:  # the root's pre-backward: gathered again, the top layer prefetched
            self._all_gather(ROOT, hold=False)
            self._copy_out(ROOT, "bwd")
            self._free_buffer(ROOT)
            self._all_gather(layers - 1, hold=False)
        if next_layer >= 0 and next_phase == "fwd":
            self._all_gather(next_layer, hold=True)
            self._copy_out(next_layer, "fwd")
        if next_layer >= 0 and next_phase == "bwd" and self.reshard:
            self._copy_out(next_layer, "bwd")  # from the buffer prefetched while the layer above computed
            self._free_buffer(next_layer)
            if next_layer > 0:
                self._all_gather(next_layer - 1, hold=False)
        return in_backward or starts_backward

    def _all_gather(self, group: int, *, hold: bool) -> None:
        """The group's all-gather output (and, where FSDP2 casts, first the copy-in of the cast shards) on the
        all-gather stream; the forward one held before is let go once it is made. `hold`: forward's, kept."""
        numel = self.group_numel[group]
        self.gathers += 1
        key = ("ag", self.step, self.gathers)
        copy_in = ("ag-in", self.step, self.gathers)
        if self.casts:
            self.sequence.append((copy_in, numel // self.ranks * self.gathered_bytes, ALL_GATHER))
        self.sequence.append((key, numel * self.gathered_bytes, ALL_GATHER))
        if self.casts:
            self.sequence.append((copy_in, FREE, ALL_GATHER))
        if self.held is not None:
            self._free_buffer(self.held)
            self.held = None
        self.buffers[group] = key
        if hold:
            self.held = group

    def _free_buffer(self, group: int) -> None:
        self.sequence.append((self.buffers.pop(group), FREE, ALL_GATHER))

    def _copy_out(self, group: int, phase: str) -> None:
        self.sequence += [(("p", self.step, phase, i), self.numels[i] * self.gathered_bytes, DEFAULT)
                          for i in self.members[group]]

    def _reshard(self, group: int, phase: str) -> None:
        self.sequence += [(("p", self.step, phase, i), FREE, DEFAULT) for i in self.members[group]]

    def _root_post_forward(self) -> None:
        if self.reshard:
            self._reshard(ROOT, "fwd")
        if self.held is not None:  # the last layer's all-gather output
            self._free_buffer(self.held)
            self.held = None

    def _post_backward(self, group: int) -> None:
        """Reshard the group, copy its gradients into a reduce-scatter input, reduce-scatter into its shards."""
        self._reshard(group, "bwd" if self.reshard else "fwd")  # ZeRO-2 kept forward's gathered parameters
        numel = self.group_numel[group]
        if self.reduce_input is not None:
            self.sequence.append((self.reduce_input, FREE, DEFAULT))
        self.reduce_input = ("rs-in", self.step, group)
        self.sequence.append((self.reduce_input, numel * self.reduce_bytes, DEFAULT))
        self.sequence += [(self.base + index, FREE, DEFAULT) for index in self.gradients_of[group]]
        self.sequence.append((("rs", self.step, group), numel * self.reduce_bytes // self.ranks, REDUCE_SCATTER))


_HEAD_AND_LOSS = ("head_fwd", "loss_fwd")
