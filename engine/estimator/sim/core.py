"""A symbolic replay of what PyTorch allocates in a training step, in pure Python.

The estimator does not guess activation memory from a rule of thumb: it replays
the step's tensor program the way PyTorch runs it. Every tensor is allocated
and freed with its real lifetime: Python references, tensors autograd saves for
backward, autocast's cache of 16-bit weights, gradient buffers, checkpointed
regions that drop their saved tensors and recompute them in backward. Backward
runs nodes in reverse creation order (what the autograd engine does for these
graphs), casts gradients to their input's dtype, accumulates multi-use
gradients out of place and hands parameter gradients to AccumulateGrad.

Sizes are symbolic: a tensor's bytes are a linear form over the monomials
(1, B, B*s, s, s*s) where B = batch * seq_len tokens and s = seq_len. One
replay therefore serves every batch size and sequence length; an estimate
evaluates a handful of linear forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# ---- symbolic sizes ------------------------------------------------------------
# Basis: constant, per token (B), per token x s (B*s), per position (s), s*s.
LF = tuple  # 5 floats
ZERO: LF = (0.0, 0.0, 0.0, 0.0, 0.0)


def lf_add(a: LF, b: LF) -> LF:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4])


def lf_sub(a: LF, b: LF) -> LF:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3], a[4] - b[4])


def lf_scale(a: LF, k: float) -> LF:
    return (a[0] * k, a[1] * k, a[2] * k, a[3] * k, a[4] * k)


def lf_eval(a: LF, values: LF) -> float:
    return a[0] * values[0] + a[1] * values[1] + a[2] * values[2] + a[3] * values[3] + a[4] * values[4]


def lf_values(tokens: int, seq_len: int) -> LF:
    """What a form's coefficients multiply at a shape: 1, tokens, tokens x sequence, sequence, sequence^2."""
    return 1.0, float(tokens), float(tokens * seq_len), float(seq_len), float(seq_len * seq_len)


def const(n: float) -> LF:
    return (float(n), 0.0, 0.0, 0.0, 0.0)


def per_token(n: float) -> LF:
    return (0.0, float(n), 0.0, 0.0, 0.0)


def per_token_seq(n: float) -> LF:
    return (0.0, 0.0, float(n), 0.0, 0.0)


def per_position(n: float) -> LF:
    return (0.0, 0.0, 0.0, float(n), 0.0)


def per_position_sq(n: float) -> LF:
    return (0.0, 0.0, 0.0, 0.0, float(n))


DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "bool": 1, "u8": 1, "i8": 1, "f8": 1}
FLOATS = ("f32", "bf16", "f16")

CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "temporary")


# ---- tensors and autograd nodes ------------------------------------------------------
@dataclass(eq=False)
class Tensor:
    elems: LF  # element count as a linear form
    dtype: str
    requires_grad: bool = False
    name: str = ""
    param: bool = False  # a leaf parameter (its storage is counted with the weights, outside the replay)
    refs: int = 0
    saved_refs: int = 0  # how many of `refs` are autograd's saved-tensor references
    alive: bool = True
    category: str = "activations"
    segment: str = ""
    freed_in: str = ""
    grad: Tensor | None = None  # gradient buffer (non-leaf) or .grad (parameter)
    grad_dtype: str = ""  # parameters: the dtype .grad must have
    cached: bool = False  # held by autocast's weight cache
    leaf: bool = False  # a leaf that is not a parameter (a pipeline stage's received input)
    view_of: Tensor | None = None  # a view: no storage of its own, keeps its base alive
    view_refs: int = 0  # how many of `refs` are held by live views of this tensor
    collected: list | None = None  # chunk's source: its parts' gradients, gathered for one SplitBackward
    offloaded: bool = False  # a saved tensor's host copy (--activation-offload): no device bytes

    @property
    def nbytes(self) -> LF:
        return lf_scale(self.elems, DTYPE_BYTES[self.dtype])


@dataclass(eq=False)
class Node:
    """One autograd node: gradient of `output` to `inputs`, with what it saved."""

    seq: int
    output: Tensor
    inputs: list[Tensor]
    saved: list[Tensor]
    backward: Callable[[Sim, Node, Tensor], list[tuple[Tensor, Tensor]]]
    name: str = ""
    segment: str = ""  # where the forward created it
    deferred: int = 0  # saved tensors dropped by a checkpointed forward, to recompute
    region: CheckpointRegion | None = None


@dataclass(eq=False)
class CheckpointRegion:
    """A non-reentrant torch.utils.checkpoint region: forward drops saved tensors, backward recomputes them.

    policy: PyTorch's selective activation checkpointing ("" for none: full checkpointing). The forward also
    stores the outputs of the ops its policy saves (Sim.policy_saved); the recompute takes them back from that
    storage, in order, instead of computing them again. "selective" keeps every matmul (mm, addmm) and fused
    attention output; "selective-op" is torchtitan's op-level policy (SelectiveAC), which keeps fused
    attention, addmm and bmm outputs and every other mm output (the 1st, 3rd, ... of the region).
    """

    function: Callable[..., object]
    inputs: tuple
    nodes: list[Node] = field(default_factory=list)
    remaining: int = 0
    recomputed: bool = False
    policy: str = ""
    stored: list[Tensor] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)  # the forward's decision for each op the policy was asked about
    mm_count: int = 0
    replayed: int = 0  # decisions the recompute has replayed
    packed: dict[int, Tensor] = field(default_factory=dict)  # positional inputs offloaded by the outer hooks

    @property
    def selective(self) -> bool:
        return bool(self.policy)


def _policy_keeps(region: CheckpointRegion, op: str) -> bool:
    """Whether the region's selective policy saves this op's output (see CheckpointRegion)."""
    if region.policy == "selective-op":  # torchtitan: compute-intensive ops, but every second mm recomputed
        if op == "mm":
            region.mm_count += 1
            return region.mm_count % 2 == 1
        return True
    return op not in ("bmm", "scaled_mm", "max")  # "selective" keeps mm and addmm: not torchao's _scaled_mm or amax


class StopRecompute(Exception):
    """torch.utils.checkpoint stops recomputing once every saved tensor exists again."""


LOWEST_LAYER_GATHER = "first_bwd_start"  # a candidate: the moment the lowest layer's backward begins
# Sim.layer_starts: candidates where the other replayed layers' backward begins (FSDP2 gathers each layer there)
LAYER_BACKWARD_STARTS = {"mid_bwd": "mid_bwd_start", "last_bwd": "last_bwd_start"}
HEAD_GATHER = "head_bwd_start"  # a candidate: the moment the head's backward begins, after the loss's (Sim.head_gather)
# compile_step with layer_starts: the middle layer above the lowest one, in its backward (FSDP2 prefetches the layer
# below it at that layer's own size)
ABOVE_LOWEST_MIDDLE = "mid_bwd_above_lowest"
# Backward's candidates before the last layer's pre-backward: FSDP2 (ZeRO-3) holds one layer gathered there, the one
# its root's pre-backward prefetched, and two in the layers' backward
BEFORE_LAYERS_BACKWARD = ("loss_bwd", "head_bwd", HEAD_GATHER)


@dataclass
class Candidate:
    """Live bytes by category at a local maximum of the timeline."""

    segment: str
    live: dict[str, LF]
    # Sim.step_in_backward: a node has just returned and given parameters their .grad (a gradient summed from
    # several uses once its last is in): the moment their post-accumulate-grad hooks step them.
    ready: bool = False
    buffered: LF = ZERO  # of "temporary": such gradients still summing in an input buffer (Sim.buffered)
    stepped: LF = ZERO  # ready: of "gradients", the .grad the node made, which the hooks step


class Sim:
    def __init__(self, *, autocast_dtype: str | None = None) -> None:
        self.seq = 0
        self.nodes: list[Node] = []
        self.live: dict[str, LF] = {category: ZERO for category in CATEGORIES}
        self.segment = "setup"
        self.candidates: list[Candidate] = []
        self._rising = False
        self.autocast_dtype = autocast_dtype  # None: autocast off
        self.autocast_cache: dict[int, Tensor] = {}
        self.phase = "forward"  # forward | backward
        self.region: CheckpointRegion | None = None  # set while a checkpointed forward runs
        self._recomputing: CheckpointRegion | None = None  # set while a region's forward is replayed
        self._taken_back: list[Tensor] = []  # what that replay took from the selective policy's storage
        self._recompute_stop = -1
        # While a checkpoint recomputes: net references taken on each tensor, and saved references added.
        self._frame: dict[int, list] | None = None
        self.tensors: list[Tensor] = []
        self.views: list[Tensor] = []
        self.segment_of_node: dict[str, str] = {}  # backward segment named after the forward segment of each node
        self.log: list[tuple[str, Tensor, str]] | None = None  # set to [] to record allocations and frees, in order
        self.parameters: list[Tensor] = []  # every leaf parameter, in creation order (the allocation sequence's weights)
        # --activation-offload (torchtune's OffloadActivations, single stream): while set, the (1, B, B*s, s, s*s)
        # values min_offload_size is judged at; host bytes packed, by the segment that packed them.
        self.offload_at: LF | None = None
        self.offloaded: dict[str, LF] = {}
        self.graph_held: list[Tensor] = []  # kept by autograd nodes' ctx attributes: freed with the graph
        # --optimizer-in-backward: a parameter used by several nodes gets its gradients summed in AccumulateGrad's
        # input buffer (temporary) and its .grad once the last one is in; `_uses` counts the ones still to come.
        self.step_in_backward = False
        self._uses: dict[int, int] = {}
        self.buffered: LF = ZERO  # the running sums of those gradients, live (one per parameter)
        self._ready = False  # the node running has made a parameter's .grad
        self._made: LF = ZERO  # the bytes of those .grad
        # A backward into gradients that exist (a pipeline stage's later micro-batches): AccumulateGrad adds each new
        # gradient in place and frees it, a drop the first backward (which keeps it as the gradient) does not have;
        # while set, the moment before each parameter's gradient is handed over is a candidate too.
        self.accumulating = False
        # FSDP2 on a pipeline stage whose layers differ in size (DeepSeek-V3's dense and MoE ones): the moment each
        # layer's backward begins is a candidate too, its own all-gather buffer then beside its copy.
        self.layer_starts = False
        # A later pipeline stage under LoRA: the moment the head's backward begins is a candidate (HEAD_GATHER)
        self.head_gather = False

    # ---- allocation bookkeeping -------------------------------------------------------
    def set_segment(self, name: str) -> None:
        self._mark_peak()
        self.segment = name

    def _mark_peak(self) -> None:
        if self._rising:
            self.candidates.append(Candidate(self.segment, dict(self.live), buffered=self.buffered))
            self._rising = False

    def new(self, elems: LF, dtype: str, *, name: str = "", requires_grad: bool = False, category: str | None = None) -> Tensor:
        """Allocate a tensor held by one Python reference."""
        tensor = Tensor(elems=elems, dtype=dtype, requires_grad=requires_grad, name=name, refs=1, segment=self.segment)
        tensor.category = category or ("activations" if self.phase == "forward" else "temporary")
        self.live[tensor.category] = lf_add(self.live[tensor.category], tensor.nbytes)
        self._rising = True
        self.tensors.append(tensor)
        if self.log is not None:
            self.log.append(("+", tensor, self.segment))
        return tensor

    def stops_as_inputs_are_saved(self, inputs: list[Tensor]) -> bool:
        """Whether a recompute ends at this op's node, before the op runs.

        Autograd saves an op's inputs before its kernel runs, and torch.utils.checkpoint stops once the
        last saved tensor is back: when that is an input (a matmul's), the op's output is never made
        again, nor taken back from the selective policy's storage (which keeps it until the region ends).
        """
        return self._recompute_stop >= 0 and len(self.nodes) == self._recompute_stop and any(
            tensor.requires_grad for tensor in inputs)

    def policy_saved(self, elems: LF, dtype: str, *, name: str, op: str = "mm") -> Tensor:
        """The output of an op (mm, addmm, bmm, sdpa) that selective checkpointing may save: if its region's
        policy keeps it, allocated once, in the forward."""
        replaying = self._recomputing
        if replaying is not None and replaying.selective:
            kept = replaying.kept[replaying.replayed]
            replaying.replayed += 1
            if kept:
                tensor = replaying.stored.pop(0)  # the storage's reference becomes the op's output reference
                self._taken_back.append(tensor)  # the replay's frame unwinds it like a tensor it made
                return tensor
            return self.new(elems, dtype, name=name)
        tensor = self.new(elems, dtype, name=name)
        region = self.region
        if region is not None and region.selective:
            region.kept.append(_policy_keeps(region, op))
            if region.kept[-1]:
                region.stored.append(self.ref(tensor))
        return tensor

    def parameter(self, elems: LF, dtype: str, *, name: str, trainable: bool, grad_dtype: str | None = None) -> Tensor:
        """A leaf parameter; its storage is counted with the model states, not here."""
        tensor = Tensor(elems=elems, dtype=dtype, requires_grad=trainable, name=name, param=True, refs=1, category="weights")
        tensor.grad_dtype = grad_dtype or dtype
        self.parameters.append(tensor)
        return tensor

    def alias(self, base: Tensor, elems: LF | None = None) -> Tensor:
        """A view of `base` (no allocation); it keeps the base alive."""
        self.ref(base)
        base.view_refs += 1
        view = Tensor(elems=elems if elems is not None else base.elems, dtype=base.dtype, refs=1,
                      segment=self.segment, alive=False, view_of=base)
        self.views.append(view)
        return view

    def ref(self, tensor: Tensor) -> Tensor:
        tensor.refs += 1
        if self._frame is not None:
            self._frame.setdefault(id(tensor), [tensor, 0, 0])[1] += 1
        return tensor

    def drop(self, *tensors: Tensor | None) -> None:
        """A Python reference goes away."""
        for tensor in tensors:
            if tensor is None:
                continue
            tensor.refs -= 1
            if self._frame is not None and id(tensor) in self._frame:
                self._frame[id(tensor)][1] -= 1
            if tensor.refs == 0:
                if tensor.view_of is not None:
                    base, tensor.view_of = tensor.view_of, None
                    base.view_refs -= 1
                    self.drop(base)
                elif tensor.alive and not tensor.param:
                    self._free(tensor)

    def _unsave(self, tensor: Tensor) -> None:
        tensor.saved_refs -= 1
        self.drop(tensor)

    def _free(self, tensor: Tensor) -> None:
        self._mark_peak()
        tensor.alive = False
        tensor.freed_in = self.segment
        self.live[tensor.category] = lf_sub(self.live[tensor.category], tensor.nbytes)
        if self.log is not None:
            self.log.append(("-", tensor, self.segment))

    def recategorize(self, tensor: Tensor, category: str) -> None:
        if tensor.category == category or not tensor.alive:
            tensor.category = category
            return
        self.live[tensor.category] = lf_sub(self.live[tensor.category], tensor.nbytes)
        tensor.category = category
        self.live[category] = lf_add(self.live[category], tensor.nbytes)

    # ---- activation offloading ---------------------------------------------------------------
    def _offloads(self, tensor: Tensor, op: str) -> bool:
        """Whether OffloadActivations' pack hook moves this saved tensor to the host: not a Parameter (a linear's
        weight is saved as its transpose, a view, which is no Parameter: that one goes), not under 1024 bytes."""
        if self.offload_at is None or self._recomputing is not None or self.phase != "forward":
            return False
        if tensor.param and op != "linear":
            return False
        return lf_eval(tensor.nbytes, self.offload_at) >= 1024

    def _pack(self, tensor: Tensor) -> Tensor:
        """The host copy standing for a saved tensor: it takes no reference on the device tensor."""
        self.offloaded[self.segment] = lf_add(self.offloaded.get(self.segment, ZERO), tensor.nbytes)
        return Tensor(elems=tensor.elems, dtype=tensor.dtype, alive=False, offloaded=True, name=tensor.name,
                      requires_grad=tensor.requires_grad)

    def _unpack(self, packed: Tensor) -> Tensor:
        """The copy back to the device, made when backward needs it. SavedVariable::unpack makes the hook's tensor
        a variable that requires grad as the saved one did: a checkpoint's recompute runs on an input that
        requires grad, as in forward (a compiled layer's graph then computes that input's gradient again)."""
        return self.new(packed.elems, packed.dtype, name=f"{packed.name} unpacked", requires_grad=packed.requires_grad)

    # ---- autograd -------------------------------------------------------------------------------
    def record(self, name: str, output: Tensor, inputs: list[Tensor], saved: list[Tensor], backward) -> None:
        """Attach a grad_fn to `output` if any input requires grad; keep saved tensors alive."""
        if not any(tensor.requires_grad for tensor in inputs):
            return
        output.requires_grad = True
        node = Node(seq=self.seq, output=output, inputs=inputs, saved=[], backward=backward, name=name, segment=self.segment)
        self.seq += 1
        if self.region is not None:
            node.deferred = len(saved)
            node.region = self.region
            self.region.nodes.append(node)
        else:
            kept = []
            for tensor in saved:
                if self._offloads(tensor, name):
                    kept.append(self._pack(tensor))
                    continue
                self.ref(tensor)
                tensor.saved_refs += 1
                if self._frame is not None:
                    self._frame.setdefault(id(tensor), [tensor, 0, 0])[2] += 1
                kept.append(tensor)
            node.saved = kept
        self.nodes.append(node)
        if self._recompute_stop >= 0 and len(self.nodes) - 1 == self._recompute_stop:
            raise StopRecompute

    def reduces_rows(self, output: Tensor, rows: LF) -> None:
        """`output` is made from one max and one sum per row (softmax, `rows` rows): eager autograd saves the output
        itself; a compiled graph may save those instead and recompute it (sim/compiled.py)."""

    def keep_until_graph_freed(self, tensor: Tensor) -> None:
        """A tensor a custom autograd Function keeps as a ctx attribute, not through save_for_backward: no
        saved-tensor hook (checkpointing, offloading) sees it and backward never releases it, so it lives as long as
        the node, until the step's graph is freed (free_graph). A recompute's nodes die as its frame unwinds."""
        self.ref(tensor)
        if self._recomputing is None:
            self.graph_held.append(tensor)

    def free_graph(self) -> None:
        """The loss goes, and with it the graph: what its nodes' ctx attributes kept goes too."""
        held, self.graph_held = self.graph_held, []
        self.drop(*held)

    def run_backward(self, loss: Tensor) -> None:
        """loss.backward(): seed a scalar gradient and run nodes in reverse creation order."""
        self.phase = "backward"
        seed = self.new(const(1), loss.dtype, name="ones_like")
        loss.grad = seed
        if self.step_in_backward:
            for node in self.nodes:
                for tensor in node.inputs:
                    if tensor.param and tensor.requires_grad:
                        self._uses[id(tensor)] = self._uses.get(id(tensor), 0) + 1
        while self.nodes:
            self._run_node(self.nodes.pop())

    def _run_node(self, node: Node) -> None:
        mapping = self.segment_of_node
        if mapping and node.segment in mapping and mapping[node.segment] != self.segment:
            self.set_segment(mapping[node.segment])
            if self.segment == "first_bwd":
                # the lowest layer's backward begins (FSDP2 gathers it here, every layer above still gathered)
                self.candidates.append(Candidate(LOWEST_LAYER_GATHER, dict(self.live), buffered=self.buffered))
            elif self.layer_starts and self.segment in LAYER_BACKWARD_STARTS:
                self.candidates.append(Candidate(LAYER_BACKWARD_STARTS[self.segment], dict(self.live),
                                                 buffered=self.buffered))
            if self.segment == "head_bwd" and self.head_gather:
                # the head's backward begins: the loss's is done, the logits' gradient made (FSDP2's root group,
                # resharded after a pipeline stage's forward, is gathered again here)
                self.candidates.append(Candidate(HEAD_GATHER, dict(self.live), buffered=self.buffered))
        if node.deferred and not node.region.recomputed:
            self._recompute(node.region)
        grad_out = node.output.grad
        if grad_out is None:
            self._release_saved(node)
            for tensor in node.inputs:  # a use that sends no gradient
                if tensor.param and self._uses.get(id(tensor)):
                    self._uses[id(tensor)] -= 1
                    if not self._uses[id(tensor)] and tensor.grad is not None:
                        self._grad_ready(tensor)
            self._hooks_step()
            return
        node.output.grad = None
        unpacked = []
        if any(tensor.offloaded for tensor in node.saved):
            # The backward function unpacks its saved tensors first; the copies die when it returns.
            node.saved = [self._unpack(tensor) if tensor.offloaded else tensor for tensor in node.saved]
            unpacked = [tensor for tensor in node.saved if tensor.name.endswith(" unpacked")]
        results = node.backward(self, node, grad_out)
        if unpacked:
            node.saved = [tensor for tensor in node.saved if all(tensor is not copy for copy in unpacked)]
            self.drop(*unpacked)
        # The engine's call_function holds the incoming gradient (its `inputs`) until validate_outputs has
        # cast and summed the results; saved tensors are released after the cast too, except under
        # checkpointing: the unpacked recomputed tensors die with the node's frame.
        if node.region is not None:
            self._release_saved(node)
        # The engine casts each gradient to its input's dtype (validate_outputs).
        casted = []
        for target, grad in results:
            if target.collected is not None:
                casted.append((target, grad))
                continue
            if grad.elems != target.elems and not target.param:
                reduced = self.new(target.elems, grad.dtype, name="sum_to")  # broadcast operand: sum_to its shape
                self.drop(grad)
                grad = reduced
            elif grad.elems != target.elems and target.param:
                reduced = self.new(target.elems, grad.dtype, name="sum_to")
                self.drop(grad)
                grad = reduced
            if grad.dtype != target.dtype and target.dtype in FLOATS and not target.param:
                converted = self.new(grad.elems, target.dtype, name="grad cast")
                self.drop(grad)
                grad = converted
            casted.append((target, grad))
        self.drop(grad_out)
        if node.region is None:
            self._release_saved(node)
        for target, grad in casted:
            self.accumulate(target, grad)
        self._hooks_step()

    def _grad_ready(self, param: Tensor) -> None:
        """The summed gradient becomes .grad (its hook steps once the node returns: _hooks_step)."""
        self.recategorize(param.grad, "gradients")
        self.buffered = lf_sub(self.buffered, param.grad.nbytes)
        self._ready, self._made = True, lf_add(self._made, param.grad.nbytes)

    def _hooks_step(self) -> None:
        """After a node that made parameters' .grad (its incoming gradient gone): a candidate, as their hooks step."""
        if self._ready:
            self._mark_peak()
            self.candidates.append(Candidate(self.segment, dict(self.live), ready=True, buffered=self.buffered,
                                             stepped=self._made))
            self._ready, self._made = False, ZERO

    def _release_saved(self, node: Node) -> None:
        for tensor in node.saved:
            if not tensor.offloaded:
                self._unsave(tensor)
        node.saved = []
        region = node.region
        if region is not None:
            region.remaining -= 1
            if region.remaining == 0:
                # The checkpoint frame (the inputs it kept, what the policy stored) dies with the region's last node.
                self._close_region(region)

    def _close_region(self, region: CheckpointRegion) -> None:
        for index, value in enumerate(region.inputs):
            if isinstance(value, Tensor) and index not in region.packed:
                self.drop(value)
        stored, region.stored = region.stored, []
        self.drop(*stored)

    def accumulate(self, target: Tensor, grad: Tensor) -> None:
        """Route a gradient: AccumulateGrad for parameters, an input buffer otherwise."""
        if not target.requires_grad:
            self.drop(grad)
            return
        if target.param:
            if self.accumulating:
                self._mark_peak()
            if grad.dtype != target.grad_dtype:
                converted = self.new(grad.elems, target.grad_dtype, name="grad cast")
                self.drop(grad)
                grad = converted
            uses = self._uses.get(id(target), 0)
            if uses:
                self._uses[id(target)] = uses = uses - 1
            summed = target.grad is not None
            if not summed:
                target.grad = grad
                if not uses:
                    self.recategorize(grad, "gradients")
                    if self.step_in_backward:
                        self._ready, self._made = True, lf_add(self._made, grad.nbytes)
                else:
                    self.buffered = lf_add(self.buffered, grad.nbytes)
            else:
                # A parameter used twice (tied embeddings): AccumulateGrad runs once, after the engine's
                # input buffer has summed both gradients, out of place (what a traced step does).
                buffered = id(target) in self._uses
                total = self.new(target.grad.elems, target.grad.dtype, name="grad sum",
                                 category="temporary" if buffered else "gradients")
                self.drop(target.grad, grad)
                target.grad = total
                if buffered and not uses:
                    self._grad_ready(target)
            return
        if target.collected is not None:
            target.collected.append(grad)
            target.grad = target.grad or grad
            return
        if target.grad is None:
            target.grad = grad
        else:
            total = self.new(target.grad.elems, target.grad.dtype, name="grad sum")
            self.drop(target.grad, grad)
            target.grad = total

    # ---- checkpointing -------------------------------------------------------------------------
    def checkpoint(self, function: Callable[..., object], *inputs, policy: str = "", positional: int = 0):
        """Run `function` as a non-reentrant checkpointed region (transformers' default); policy: see
        CheckpointRegion. The first `positional` inputs are the function's positional arguments, which the
        checkpoint saves through autograd's saved-tensor hooks (so they can be offloaded); the rest are keyword
        arguments its closure keeps."""
        region = CheckpointRegion(function=function, inputs=inputs, policy=policy)
        for index, value in enumerate(inputs):
            if isinstance(value, Tensor):
                if index < positional and self._offloads(value, "checkpoint"):
                    region.packed[index] = self._pack(value)
                    continue
                self.ref(value)  # the checkpoint frame keeps its inputs
        outer, self.region = self.region, region
        try:
            output = function(*inputs)
        finally:
            self.region = outer
        region.remaining = len(region.nodes)
        if not region.nodes:
            self._close_region(region)
        return output

    def _recompute(self, region: CheckpointRegion) -> None:
        """Re-run the region's forward to recreate its saved tensors, stopping after the last one."""
        region.recomputed = True
        targets = region.nodes
        last = max((index for index, node in enumerate(targets) if node.deferred), default=-1)
        outer_nodes, self.nodes = self.nodes, []
        outer_cache, self.autocast_cache = self.autocast_cache, {}
        phase, self.phase = self.phase, "backward"
        first_tensor = len(self.tensors)
        first_view = len(self.views)
        # Offloaded inputs come back to the device as the recompute unpacks them; its frame holds the copies.
        inputs = tuple(self._unpack(region.packed[index]) if index in region.packed else value
                       for index, value in enumerate(region.inputs))
        self._recompute_stop = last
        self._frame = {}
        self._recomputing = region
        try:
            region.function(*inputs)
        except StopRecompute:
            pass
        finally:
            self._recompute_stop = -1
            self._recomputing = None
            frame, self._frame = self._frame, None
        recomputed, self.nodes = self.nodes, outer_nodes
        # The recomputed forward's frame unwinds: only saved tensors survive, with the bases of saved views.
        for view in reversed(self.views[first_view:]):
            while view.view_of is not None and view.refs > view.saved_refs + view.view_refs:
                self.drop(view)
        new_tensors = self.tensors[first_tensor:] + self._taken_back
        self._taken_back = []
        for tensor in new_tensors:
            while tensor.alive and tensor.refs > tensor.saved_refs + (1 if tensor.cached else 0) + tensor.view_refs:
                self.drop(tensor)
        # Tensors from before the recompute (the region's inputs): the frame's own references to them go too;
        # what the recompute saved, and views of them it saved, stay.
        fresh = {id(tensor) for tensor in new_tensors} | {id(view) for view in self.views[first_view:]}
        held_by_views: dict[int, int] = {}
        for view in self.views[first_view:]:
            if view.view_of is not None:
                held_by_views[id(view.view_of)] = held_by_views.get(id(view.view_of), 0) + 1
        for key, (tensor, net, saved) in frame.items():
            if key in fresh:
                continue
            for _ in range(max(net - saved - held_by_views.get(key, 0), 0)):
                self.drop(tensor)
        self.clear_autocast_cache()  # checkpoint re-entered autocast; leaving it clears the cache
        self.autocast_cache = outer_cache
        self.phase = phase
        for original, replay in zip(targets, recomputed):
            original.saved = replay.saved

    # ---- autocast -----------------------------------------------------------------------------
    def clear_autocast_cache(self) -> None:
        cached = list(self.autocast_cache.values())
        self.autocast_cache = {}
        for tensor in cached:
            self.drop(tensor)

    def finish(self) -> list[Candidate]:
        self._mark_peak()
        return self.candidates
