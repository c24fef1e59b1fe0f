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

Checked against `memtui trace --gpus N` per stream (tests/test_reserved_data_parallel.py). Followed: data-parallel
FSDP2 of a full fine-tune (no tensor or pipeline parallelism, LoRA, quantization, offload, gradient accumulation).
"""

from __future__ import annotations

from memtui.engine.allocator import FREE
from memtui.engine.estimator.sim.program import AllocationProgram

DEFAULT, ALL_GATHER, REDUCE_SCATTER = 0, 1, 2  # the streams (their numbers only keep their pools apart)
ROOT = -1  # the root group's number; decoder layers are 0..L-1

Event = tuple[object, int, int]  # (key, bytes or FREE, stream)


class Fsdp2Rank:
    """What FSDP2 puts into a rank's sequence (memtui.engine.estimator.reserved.allocation_sequence runs the steps):
    the shards, each step's forward and backward with FSDP2's hooks between the program's events, the shards the
    optimizer steps and what zero_grad lets go. `weights`: each parameter's bytes as gathered (the program's
    parameters are in that dtype, `gathered_bytes` an element); `stored_bytes`: of a shard's element;
    `reduce_bytes`: of the reduce-scatter input's and output's."""

    def __init__(self, program: AllocationProgram, weights: list[int], *, ranks: int, reshard_after_forward: bool,
                 gathered_bytes: int, stored_bytes: int, reduce_bytes: int, casts: bool) -> None:
        self.program, self.ranks, self.reshard, self.casts = program, ranks, reshard_after_forward, casts
        self.gathered_bytes, self.stored_bytes, self.reduce_bytes = gathered_bytes, stored_bytes, reduce_bytes
        self.numels = [size // gathered_bytes for size in weights]
        group_of = [ROOT] * len(self.numels)
        for layer, (first, end) in enumerate(program.layer_parameters):
            group_of[first:end] = [layer] * (end - first)
        self.members: dict[int, list[int]] = {}
        for position, group in enumerate(group_of):
            self.members.setdefault(group, []).append(position)
        self.group_numel = {group: sum(self.numels[i] for i in positions) for group, positions in self.members.items()}
        gradient_of = dict(program.gradients)  # parameter position -> its gradient's tensor index
        self.gradients_of = {group: [gradient_of[i] for i in positions if i in gradient_of]
                             for group, positions in self.members.items()}

    def shards(self) -> list[Event]:
        return [(("w", i), numel * self.stored_bytes // self.ranks, DEFAULT) for i, numel in enumerate(self.numels)]

    def shard_bytes(self, parameter: int) -> int:
        """A parameter's shard as the optimizer steps it (and its gradient's)."""
        return self.numels[parameter] * self.reduce_bytes // self.ranks

    def run_step(self, sequence: list, step: int, sizes: list[int]) -> None:
        """Forward and backward of step `step`, the program's events at `sizes`, appended to `sequence`."""
        _Step(self, sequence, step).run(sizes)

    def zero_grad(self, step: int) -> list[Event]:
        """The sharded gradients are views of each group's reduce-scatter output: they go together."""
        return [(("rs", step, group), FREE, REDUCE_SCATTER) for group in self.members]


class _Step:
    """One step's forward and backward under FSDP2: the program's events, FSDP2's own between them."""

    def __init__(self, rank: Fsdp2Rank, sequence: list, step: int) -> None:
        self.rank, self.sequence, self.step = rank, sequence, step
        self.base = step << 32  # the program's tensors of this step: keys apart from every other step's
        self.buffers: dict[int, tuple] = {}  # each gathered group's all-gather output not yet freed
        self.held: int | None = None  # the group whose forward all-gather output is kept until the next
        self.reduce_input: tuple | None = None  # the last reduce-scatter's input, kept until the next
        self.gathers = 0

    def run(self, sizes: list[int]) -> None:
        program, sequence, base = self.rank.program, self.sequence, self.base
        layers = len(program.layer_parameters)
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
        reshard = self.rank.reshard
        if layer >= 0 and phase == "fwd" and reshard:
            self._reshard(layer, "fwd")  # post-forward
        if layer >= 0 and phase == "bwd" or phase == "embed_bwd":
            self._post_backward(layer if layer >= 0 else ROOT)
        if phase in _HEAD_AND_LOSS and next_phase not in _HEAD_AND_LOSS:
            self._root_post_forward()  # the model's forward (its loss included) has returned
        starts_backward = not in_backward and next_phase.endswith("bwd")
        if starts_backward and reshard:  # the root's pre-backward: gathered again, the top layer prefetched
            self._all_gather(ROOT, hold=False)
            self._copy_out(ROOT, "bwd")
            self._free_buffer(ROOT)
            self._all_gather(layers - 1, hold=False)
        if next_layer >= 0 and next_phase == "fwd":
            self._all_gather(next_layer, hold=True)
            self._copy_out(next_layer, "fwd")
        if next_layer >= 0 and next_phase == "bwd" and reshard:
            self._copy_out(next_layer, "bwd")  # from the buffer prefetched while the layer above computed
            self._free_buffer(next_layer)
            if next_layer > 0:
                self._all_gather(next_layer - 1, hold=False)
        return in_backward or starts_backward

    def _all_gather(self, group: int, *, hold: bool) -> None:
        """The group's all-gather output (and, where FSDP2 casts, first the copy-in of the cast shards) on the
        all-gather stream; the forward one held before is let go once it is made. `hold`: forward's, kept."""
        rank = self.rank
        numel = rank.group_numel[group]
        self.gathers += 1
        key = ("ag", self.step, self.gathers)
        copy_in = ("ag-in", self.step, self.gathers)
        if rank.casts:
            self.sequence.append((copy_in, numel // rank.ranks * rank.gathered_bytes, ALL_GATHER))
        self.sequence.append((key, numel * rank.gathered_bytes, ALL_GATHER))
        if rank.casts:
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
        rank = self.rank
        self.sequence += [(("p", self.step, phase, i), rank.numels[i] * rank.gathered_bytes, DEFAULT)
                          for i in rank.members[group]]

    def _reshard(self, group: int, phase: str) -> None:
        self.sequence += [(("p", self.step, phase, i), FREE, DEFAULT) for i in self.rank.members[group]]

    def _root_post_forward(self) -> None:
        if self.rank.reshard:
            self._reshard(ROOT, "fwd")
        if self.held is not None:  # the last layer's all-gather output
            self._free_buffer(self.held)
            self.held = None

    def _post_backward(self, group: int) -> None:
        """Reshard the group, copy its gradients into a reduce-scatter input, reduce-scatter into its shards."""
        rank = self.rank
        self._reshard(group, "bwd" if rank.reshard else "fwd")  # ZeRO-2 kept forward's gathered parameters
        numel = rank.group_numel[group]
        if self.reduce_input is not None:
            self.sequence.append((self.reduce_input, FREE, DEFAULT))
        self.reduce_input = ("rs-in", self.step, group)
        self.sequence.append((self.reduce_input, numel * rank.reduce_bytes, DEFAULT))
        self.sequence += [(self.base + index, FREE, DEFAULT) for index in rank.gradients_of[group]]
        self.sequence.append((("rs", self.step, group), numel * rank.reduce_bytes // rank.ranks, REDUCE_SCATTER))


_HEAD_AND_LOSS = ("head_fwd", "loss_fwd")
