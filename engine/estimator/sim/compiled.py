"""--compile: a decoder layer as torch.compile runs it (AOTAutograd's min-cut partitioner, inductor's fusion).

The layer's eager op program (families.py) is recorded, not run; what the compiled layer allocates follows
from each op's kind, the rule inductor's partitioner (`min_cut_rematerialization_partition`) and its fusion
arrive at for these graphs:

- extern ops (matmuls, attention) are kernels of their own: their outputs always exist, and so do their
  inputs (a pointwise chain feeding a matmul is one fused kernel that writes the matmul's input);
- reductions (RMSNorm's mean) are never recomputed in backward (their outputs are 4x smaller than their inputs);
- pointwise ops (casts, RMSNorm's scaling, RoPE, SiLU * up, residual adds) are fused into the kernel that
  consumes them: no buffer of their own unless something must read it from memory (an extern op, the layer's
  output, or backward);
- what backward needs (what eager autograd would save) is saved at the minimum cut between the layer's inputs
  and backward, found by max-flow over the layer's tensors as the partitioner does: a tensor costs its bytes
  (twice that if the forward would not write it anyway), and what cannot be recomputed (the layer's inputs,
  extern ops' outputs, reductions, what an extern op's backward reads) is never recomputed. RMSNorm, RoPE
  and SiLU * up are then recomputed in backward from matmul outputs and the layer's input.

Backward mirrors it: each extern op's backward is a kernel (a matmul's weight and input gradients, attention's
q, k, v gradients, a gather's index_put into zeros), the gradient it reads is written by a fused kernel when a
pointwise chain made it, a broadcast operand's gradient (a reduction) is computed where its op's is, and every
buffer, saved tensor and incoming gradient is freed once the last kernel reading it has run (inductor frees its
inputs at their last use). Checked against `memtui trace --compile` (tests/test_compile.py).

torchtitan's op-level selective checkpoint (--checkpointing selective-op) is compiled into the layer's graph
(torchtitan compiles each checkpoint-wrapped block): its policy tags every op MUST_SAVE or PREFER_RECOMPUTE, and
the partitioner saves the former where backward reads them and always recomputes the latter (_sac_saved). Backward
then recomputes, just before their first use, the matmuls it needs again and the inputs of matmuls and attention
it reads, each into a buffer of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from memtui.engine.estimator.sim.core import LF, CheckpointRegion, Sim, Tensor, _policy_keeps

EXTERN = ("linear", "addmm", "bmm", "flash")  # sim.record names of ops inductor calls a library kernel for
REDUCTIONS = ("mean", "sum", "amax")
UNRECOMPUTABLE = ("pad",)  # not among the partitioner's recomputable ops (constant_pad_nd): saved once made
TANGENT = "tangent"


@dataclass(eq=False)
class _Op:
    name: str
    out: Tensor
    inputs: list[Tensor]
    saved: list[Tensor]
    grad: bool
    view: bool
    extras: list[Tensor]  # other tensors the op allocated (attention's logsumexp, a dropout mask)
    # what recomputing the output reads besides its inputs, no gradient flowing to them: softmax's per-row max and
    # sum (torch._decomp's _softmax: amax, exp(x - max), sum, div), reductions the partitioner never recomputes
    stats: list[Tensor] = field(default_factory=list)


class _Recorder(Sim):
    """A Sim that records a layer's ops and leaves the tensors it did not make (inputs, parameters, RoPE's
    cos and sin, masks) untouched."""

    def __init__(self, sim: Sim, policy: str = "") -> None:
        super().__init__(autocast_dtype=sim.autocast_dtype)
        # a selective checkpoint traced into the graph: the policy's decisions, as the tags it gives the nodes
        self.policy = CheckpointRegion(function=lambda: None, inputs=(), policy=policy) if policy else None
        self.must_save: set[int] = set()  # the outputs tagged MUST_SAVE (the rest: PREFER_RECOMPUTE)
        for name in ("causal_mask", "window_mask"):
            if hasattr(sim, name):
                setattr(self, name, getattr(sim, name))
        self.ops: list[_Op] = []
        self.own: set[int] = set()
        self._fresh: list[Tensor] = []
        self.same: dict[int, Tensor] = {}  # a recomputed value -> the op output it repeats
        self._computed: dict[tuple, Tensor] = {}
        self._rows: dict[int, LF] = {}  # softmax outputs -> their rows (see Sim.reduces_rows)

    def new(self, elems, dtype, *, name="", requires_grad=False, category=None) -> Tensor:
        tensor = super().new(elems, dtype, name=name, requires_grad=requires_grad, category=category)
        self.own.add(id(tensor))
        self._fresh.append(tensor)
        return tensor

    def alias(self, base: Tensor, elems=None) -> Tensor:
        view = Tensor(elems=elems if elems is not None else base.elems, dtype=base.dtype, refs=1,
                      segment=self.segment, alive=False, view_of=base)
        self.own.add(id(view))
        return view

    def ref(self, tensor: Tensor) -> Tensor:
        return tensor

    def policy_saved(self, elems: LF, dtype: str, *, name: str, op: str = "mm") -> Tensor:
        tensor = self.new(elems, dtype, name=name)
        if self.policy is not None and _policy_keeps(self.policy, op):
            self.must_save.add(id(tensor))
        return tensor

    def reduces_rows(self, output: Tensor, rows: LF) -> None:
        self._rows[id(output)] = rows

    def drop(self, *tensors) -> None:
        pass

    def record(self, name, output, inputs, saved, backward) -> None:
        grad = any(tensor.requires_grad for tensor in inputs)
        extras = [t for t in self._fresh if t is not output and all(t is not i for i in inputs)]
        self._fresh = []
        inputs = [self.same.get(id(t), t) for t in inputs]
        saved = [self.same.get(id(t), t) for t in saved]
        if grad:
            output.requires_grad = True
        if not extras and output.view_of is None and name not in EXTERN and id(output) in self.own:
            # The graph's common subexpressions are one node (peft casts one input to fp32 for each adapter).
            key = (name, output.dtype, output.elems, tuple(id(t) for t in inputs))
            earlier = self._computed.get(key)
            if earlier is not None:
                self.same[id(output)] = earlier
                return
            self._computed[key] = output
        stats: list[Tensor] = []
        rows = self._rows.pop(id(output), None)
        if rows is not None:
            # the row max of the input, then the sum of exp(input - max): fp32 whatever the input's dtype
            for stat, reads in (("amax", inputs[:1]), ("sum", inputs[:1])):
                tensor = Tensor(elems=rows, dtype="f32", name=f"{name} {stat}", segment=self.segment, alive=False)
                self.own.add(id(tensor))
                reads = reads + stats  # the sum reads the max
                self.ops.append(_Op(stat, tensor, reads, [], False, False, []))
                stats.append(tensor)
        self.ops.append(_Op(name, output, inputs, saved, grad, output.view_of is not None, extras, stats))


@dataclass(eq=False)
class _Buf:
    """A backward buffer: a gradient some kernel writes."""

    elems: tuple
    dtype: str
    name: str
    param: Tensor | None = None  # a parameter's gradient (AccumulateGrad takes it)


@dataclass
class _Plan:
    forward: list[tuple[list[Tensor], list[Tensor]]]  # per kernel: (allocated, freed after it)
    saved: list[Tensor]  # in the node's order
    grad_inputs: list[Tensor]  # what requires grad among the layer's external inputs
    backward: list[tuple[list[_Buf], set]] = field(default_factory=list)  # per kernel: (allocated, reads)
    outputs: dict[int, _Buf] = field(default_factory=dict)  # id(external input) -> its gradient
    # a selective checkpoint in the graph: what backward recomputes into a buffer of its own (an extern op's output
    # or input), by the tensor's id
    recomputed: dict[int, _Buf] | None = None


def compiled_layer(sim: Sim, layer: Callable[[Sim, Tensor], Tensor], x: Tensor, policy: str = "") -> Tensor:
    """Run `layer` (a function of a Sim and the hidden states) as one compiled graph in `sim`; `policy`: a selective
    checkpoint of the whole layer traced into the graph ("selective-op": torchtitan's, which compiles each
    checkpoint-wrapped block), see _sac_saved."""
    recorder = _Recorder(sim, policy)
    out = layer(recorder, x)
    out = recorder.same.get(id(out), out)
    plan = _plan(recorder, out)
    real: dict[int, Tensor] = {}

    def real_of(tensor: Tensor) -> Tensor:
        return real.get(id(tensor), tensor)

    for allocated, freed in plan.forward:
        for tensor in allocated:
            real[id(tensor)] = sim.new(tensor.elems, tensor.dtype, name=f"compiled {tensor.name}")
        sim.drop(*(real[id(tensor)] for tensor in freed))
    result = real[id(out)]
    saved = [real_of(tensor) for tensor in plan.saved]
    sim.record("compiled layer", result, [real_of(t) for t in plan.grad_inputs], saved, _backward(plan))
    # The forward's own references go: the layer's output is returned, the saved tensors are the node's.
    sim.drop(*(real[id(t)] for t in plan.saved if id(t) in real))
    return result


def _backward(plan: _Plan):
    def backward(sim: Sim, node, grad):
        saved_now = list(node.saved)  # the recomputed ones under checkpointing, in the planned order
        by_key: dict[object, Tensor] = {id(key): tensor for key, tensor in zip(plan.saved, saved_now)}
        by_key[TANGENT] = grad
        last: dict[object, int] = {}
        for index, (_allocated, reads) in enumerate(plan.backward):
            for key in reads:
                last[key] = index
        release: dict[int, list] = {}
        for key, index in last.items():
            release.setdefault(index, []).append(key)
        kept = {id(buf) for buf in plan.outputs.values()}
        freed_tangent = False
        for index, (allocated, _reads) in enumerate(plan.backward):
            for buf in allocated:
                tensor = sim.new(buf.elems, buf.dtype, name=f"compiled {buf.name}")
                by_key[buf] = tensor
                if buf.param is not None:
                    sim.accumulate(buf.param, tensor)  # AccumulateGrad takes the graph's output
            for key in release.get(index, ()):
                tensor = by_key.get(key)
                if tensor is None:
                    continue
                if key == TANGENT:
                    if grad.refs == 1:  # the engine's reference only: inductor frees it here
                        sim.drop(grad)
                        freed_tangent = True
                elif isinstance(key, _Buf):
                    if key.param is None and id(key) not in kept:
                        sim.drop(tensor)
                elif any(t is tensor for t in node.saved):
                    node.saved = [t for t in node.saved if t is not tensor]
                    sim._unsave(tensor)
        if freed_tangent:
            grad.refs += 1  # freed at its last use: the engine's own release finds it gone
        return [(target, by_key[plan.outputs[id(target)]]) for target in plan.grad_inputs
                if id(target) in plan.outputs]

    return backward


def _plan(recorder: _Recorder, out: Tensor) -> _Plan:
    ops = recorder.ops
    own = recorder.own
    producer: dict[int, _Op] = {}
    for op in ops:
        producer[id(op.out)] = op

    def base(tensor: Tensor) -> Tensor:
        while True:
            op = producer.get(id(tensor))
            if op is None or not op.view or not op.inputs:
                return tensor
            tensor = op.inputs[0]

    # What must exist in memory in forward: extern ops' inputs and outputs, the layer's output.
    needed_in_memory = {id(base(out))}
    for op in ops:
        needed_in_memory.update(id(t) for t in op.extras)
        if op.name in EXTERN:
            needed_in_memory.update(id(base(t)) for t in op.inputs)
            needed_in_memory.add(id(op.out))
    if recorder.policy is not None:
        saved = _sac_saved(ops, own, base, producer, recorder.must_save)
    else:
        saved = _cut(ops, own, base, producer, needed_in_memory)
    saved_ids = {id(t) for t in saved}
    frontier_cache: dict[int, list[Tensor]] = {}

    def frontier(tensor: Tensor) -> list[Tensor]:
        """The saved tensors backward recomputes `tensor` from (itself when it is saved)."""
        root = base(tensor)
        hit = frontier_cache.get(id(root))
        if hit is not None:
            return hit
        if id(root) in saved_ids or id(root) not in own or id(root) not in producer:
            found = [root]
        else:
            found = []
            for source in producer[id(root)].inputs + producer[id(root)].stats:
                for t in frontier(source):
                    if all(t is not f for f in found):
                        found.append(t)
        frontier_cache[id(root)] = found
        return found

    materialized = needed_in_memory | {id(t) for t in saved if id(t) in own}
    # Forward kernels, in op order: each writes its materialized output (and an extern op's extras) and reads the
    # materialized tensors its fused chain starts at.
    reads_cache: dict[int, set[int]] = {}

    def reads(tensor: Tensor) -> set[int]:
        root = base(tensor)
        if id(root) not in own or id(root) in materialized or id(root) not in producer:
            return {id(root)}
        hit = reads_cache.get(id(root))
        if hit is None:
            hit = set()
            for source in producer[id(root)].inputs + producer[id(root)].stats:
                hit |= reads(source)
            reads_cache[id(root)] = hit
        return hit

    kernels: list[tuple[list[Tensor], set[int]]] = []
    for op in ops:
        allocated = [t for t in op.extras if id(t) in own]
        if not op.view and id(op.out) in materialized:
            allocated.insert(0, op.out)
        if not allocated:
            continue
        read: set[int] = set()
        for source in op.inputs + op.stats:
            read |= reads(source)
        kernels.append((allocated, read))
    last_read: dict[int, int] = {}
    for index, (allocated, read) in enumerate(kernels):
        for key in read:
            last_read[key] = index
    keep = {id(t) for t in saved} | {id(base(out))}
    forward: list[tuple[list[Tensor], list[Tensor]]] = [(allocated, []) for allocated, _read in kernels]
    for index, (allocated, _read) in enumerate(kernels):
        for tensor in allocated:
            if id(tensor) not in keep:
                forward[max(last_read.get(id(tensor), index), index)][1].append(tensor)
    grad_inputs: list[Tensor] = []
    for op in ops:
        for tensor in op.inputs:
            root = base(tensor)
            if id(root) not in own and root.requires_grad and all(root is not t for t in grad_inputs):
                grad_inputs.append(root)
    plan = _Plan(forward=forward, saved=saved, grad_inputs=grad_inputs)
    if recorder.policy is not None:
        plan.recomputed = {key: _Buf(producer[key].out.elems, producer[key].out.dtype, f"recomputed {producer[key].name}")
                           for key in needed_in_memory - saved_ids if key in own and key in producer}
    _plan_backward(plan, ops, out, own, base, frontier, producer)
    return plan


def _sac_saved(ops: list[_Op], own: set[int], base, producer: dict[int, _Op], must_save: set[int]) -> list[Tensor]:
    """What the forward saves when the layer is a selective checkpoint traced into the graph.

    Under torch.compile the checkpoint's policy tags every node of the region MUST_SAVE or PREFER_RECOMPUTE
    (utils/checkpoint.py _CachingTorchDispatchMode), and the min-cut partitioner honours both: a MUST_SAVE node is
    banned from recomputation, a PREFER_RECOMPUTE one gets an infinite edge to the sink and no capacity of its own,
    so it is never saved (partitioners.py solve_min_cut, must_recompute). What backward reads is then saved where
    it is MUST_SAVE or a graph input (the layer's input, parameters, RoPE's cos and sin), and otherwise recomputed
    from such tensors; saved values backward does not read are dropped."""
    saved: list[Tensor] = []
    seen: set[int] = set()

    def visit(tensor: Tensor) -> None:
        root = base(tensor)
        if id(root) in seen:
            return
        seen.add(id(root))
        made = producer.get(id(root))
        if id(root) not in own or made is None or id(root) in must_save:
            saved.append(root)
            return
        for source in made.inputs + made.stats:
            visit(source)

    for op in ops:
        if op.grad:
            for tensor in op.saved:
                visit(tensor)
    return saved


# Sizes are linear forms in (1, tokens, tokens x s, s, s x s): the cut is chosen at 2048 tokens of one sequence.
_REFERENCE = (1.0, 2048.0, 2048.0 * 2048, 2048.0, 2048.0 * 2048)


def _decomposed_depth(op: _Op) -> int:
    """Nodes of the joint graph between an op's inputs and its output once decomposed: one, but for softmax
    (torch._decomp's _softmax: sub, exp, div, each a node; a 16-bit input converted to fp32 and back, two more)."""
    if op.name != "softmax":
        return 1
    return 3 + 2 * (op.out.dtype != "f32")


def _distances_from_backward(ops: list[_Op], base) -> dict[int, float]:
    """Each tensor's dist_from_bw (min_cut_rematerialization_partition's): 1 when backward reads it, else one more
    than the nearest of its users' (through a decomposed op's nodes); unreached: none."""
    distance: dict[int, float] = {}
    for op in ops:
        if op.grad:
            for tensor in op.saved:
                distance[id(base(tensor))] = 1
    stats = {id(stat) for op in ops for stat in op.stats}
    for op in reversed(ops):
        if op.view or id(op.out) in stats:  # a softmax's max and sum: reached through the softmax (below)
            continue
        after = distance.get(id(base(op.out)))
        if after is None:
            continue
        for source in op.inputs:
            key = id(base(source))
            distance[key] = min(distance.get(key, after + _decomposed_depth(op)), after + _decomposed_depth(op))
        # _softmax's nodes from its output back: [convert,] div, then sum and exp, sub, then amax
        converted = _decomposed_depth(op) - 3
        for stat, depth in zip(op.stats, (3, 1)):
            distance[id(stat)] = after + depth + converted // 2
    return distance


def _cut(ops: list[_Op], own: set[int], base, producer: dict[int, _Op], in_memory: set[int]) -> list[Tensor]:
    """What the forward saves: AOTAutograd's min-cut (min_cut_rematerialization_partition, inductor's options).

    A flow network over the layer's tensors: each tensor's capacity is its bytes (twice that if the forward would
    not otherwise write it to memory), what backward reads is tied to the sink, and what cannot be recomputed to
    the source: the layer's inputs, extern ops' outputs, reductions (their outputs are 4x smaller than their
    inputs), random ops' masks, and what an extern op's backward reads (`ban_if_materialized_backward`).
    Parameters cost nothing to save (they are alive anyway). The saved tensors are the cut's edges."""
    from memtui.engine.estimator.sim.core import lf_eval

    infinite = float("inf")
    capacity: dict[object, dict[object, float]] = {}

    def edge(a, b, value) -> None:
        capacity.setdefault(a, {})[b] = capacity.get(a, {}).get(b, 0.0) + value
        capacity.setdefault(b, {}).setdefault(a, 0.0)

    tensors: dict[int, Tensor] = {}
    distance = _distances_from_backward(ops, base)

    def node(tensor: Tensor) -> int:
        root = base(tensor)
        key = id(root)
        if key not in tensors:
            tensors[key] = root
            # get_node_weight: bytes, times 1.1 per node between it and backward ("bias towards nodes closer to
            # the backwards pass"), twice that if the forward would not write it anyway
            weight = 0.0 if root.param else lf_eval(root.nbytes, _REFERENCE) * 1.1 ** max(
                min(distance.get(key, 100), 100), 1)
            if key in own and key not in in_memory:
                weight *= 2
            edge((key, 0), (key, 1), weight)
            made = producer.get(key)
            if key not in own or made is None or made.name in EXTERN + REDUCTIONS + UNRECOMPUTABLE:
                edge("source", (key, 0), infinite)
        return key

    for op in ops:
        if op.view:
            continue
        for extra in op.extras:
            edge("source", (node(extra), 0), infinite)
        if id(op.out) in own:
            out = node(op.out)
            for source in op.inputs + op.stats:
                edge((node(source), 1), (out, 0), infinite)
        if not op.grad:
            continue
        for tensor in op.saved:
            key = node(tensor)
            edge((key, 1), "sink", infinite)
            if op.name in EXTERN:
                edge("source", (key, 0), infinite)
    # Edmonds-Karp: shortest augmenting paths until none is left.
    while True:
        parent: dict[object, object] = {"source": None}
        queue = ["source"]
        for at in queue:
            if at == "sink":
                break
            for to, left in capacity.get(at, {}).items():
                if left > 0 and to not in parent:
                    parent[to] = at
                    queue.append(to)
        if "sink" not in parent:
            break
        path, at = [], "sink"
        while parent[at] is not None:
            path.append((parent[at], at))
            at = parent[at]
        push = min(capacity[a][b] for a, b in path)
        if push == infinite:
            raise ValueError("a compiled layer's saved tensors have no finite cut")
        for a, b in path:
            capacity[a][b] -= push
            capacity[b][a] += push
    reachable = set(parent)
    return [tensor for key, tensor in tensors.items() if (key, 0) in reachable and (key, 1) not in reachable]


@dataclass(eq=False)
class _Expr:
    """A gradient in backward: a buffer some kernel wrote (`buf`), or a fused expression of what it reads (buffers,
    saved tensors, other expressions), computed by whichever kernel reads it until one materializes it."""

    reads: set
    buf: object = None


SCATTERED = ("index", "topk", "gather")  # gathers: backward scatters into zeros (index_put, an extern kernel)
PASS_THROUGH = ("add", "add_scalar", "add_", "sub")  # the gradient goes on unchanged (same size and dtype)


def _plan_backward(plan: _Plan, ops: list[_Op], out: Tensor, own: set[int], base, frontier, producer) -> None:
    """Backward's kernels, in reverse op order (see the module's docstring)."""
    grads: dict[int, _Expr] = {id(out): _Expr(set(), TANGENT)}
    external: dict[int, tuple[Tensor, _Expr]] = {}
    recomputed = plan.recomputed or {}
    recompute_reads: dict[_Buf, set] = {}
    emitted: set = set()

    def read_of(tensor: Tensor) -> set:
        """Under a selective checkpoint, what backward reads for `tensor`: a saved tensor, the buffer it is
        recomputed into (an extern op's output or input: a kernel of its own must write it), or the sources of a
        pointwise chain fused into the kernel that reads it."""
        root = base(tensor)
        buf = recomputed.get(id(root))
        if buf is not None:
            if buf not in recompute_reads:
                made = producer[id(root)]
                recompute_reads[buf] = set().union(*(read_of(t) for t in made.inputs + made.stats))
            return {buf}
        if any(root is t for t in plan.saved) or id(root) not in own or id(root) not in producer:
            return {id(root)}
        made = producer[id(root)]
        return set().union(*(read_of(t) for t in made.inputs + made.stats))

    def recompute(reads: set) -> None:
        """The recompute kernels of the buffers a kernel reads, just before it (the partitioner's
        reordering_to_mimic_autograd_engine puts each recomputed node before its first use in backward)."""
        for read in reads:
            if isinstance(read, _Buf) and read in recompute_reads and read not in emitted:
                emitted.add(read)
                recompute(recompute_reads[read])
                plan.backward.append(([read], set(recompute_reads[read])))

    def resolve(reads: set) -> set:
        found: set = set()
        for read in reads:
            if isinstance(read, _Expr):
                found |= {read.buf} if read.buf is not None else resolve(read.reads)
            else:
                found.add(read)
        return found

    def kernel(allocated: list[_Buf], reads: set) -> None:
        reads = resolve(reads)
        recompute(reads)
        plan.backward.append((allocated, reads))

    made_by = {id(base(op.out)): op for op in ops if not op.view}

    def unwritten(expr: _Expr) -> set:
        """The expressions (itself included) a gradient is computed from that no kernel has written yet."""
        found = {id(expr)}
        for read in expr.reads:
            if isinstance(read, _Expr) and read.buf is None:
                found |= unwritten(read)
        return found

    def materialize(gradient: _Expr, like: Tensor, name: str):
        if gradient.buf is None:
            # A matmul's output gradient still to be written that this one is computed from (a LoRA'd layer's:
            # the base matmul's 16-bit gradient and the adapters' fp32 one) comes out of the same fused kernel.
            shared = unwritten(gradient) - {id(gradient)}
            siblings = [(pending, made_by[key].out) for key, pending in grads.items()
                        if pending is not gradient and pending.buf is None and key in made_by
                        and made_by[key].name in ("linear", "addmm") and unwritten(pending) & shared]
            reads = resolve(gradient.reads)
            recompute(reads)
            gradient.buf = _Buf(like.elems, like.dtype, name)
            for pending, out in siblings:
                pending.buf = _Buf(out.elems, out.dtype, "output grad")
            plan.backward.append(([gradient.buf] + [pending.buf for pending, _ in siblings], reads))
        return gradient.buf

    def flow(target: Tensor, gradient: _Expr) -> None:
        root = base(target)
        if not root.requires_grad:
            return
        if id(root) not in own:
            if root.param:
                kernel([_Buf(root.elems, root.grad_dtype or root.dtype, f"{root.name} grad", param=root)], {gradient})
                return
            previous = external.get(id(root))
            external[id(root)] = (root, gradient if previous is None else _Expr({previous[1], gradient}))
            return
        previous = grads.get(id(root))
        grads[id(root)] = gradient if previous is None else _Expr({previous, gradient})

    def extern_grad(target: Tensor, buf: _Buf) -> None:
        root = base(target)
        if id(root) not in own and root.param and buf.dtype == (root.grad_dtype or root.dtype):
            buf.param = root  # the matmul writes the parameter's gradient itself
            return
        flow(target, _Expr(set(), buf))

    def saved_reads(op: _Op) -> set:
        if recomputed:
            return set().union(*(read_of(s) for s in op.saved))
        return {id(t) for s in op.saved for t in frontier(s)}

    for op in reversed(ops):
        if not op.grad:
            continue
        gradient = grads.pop(id(op.out), None)
        if gradient is None:
            continue
        if op.view:
            for source in op.inputs:
                flow(source, gradient)
            continue
        if op.name in ("linear", "addmm"):
            x, weight = op.inputs[0], op.inputs[1]
            bias = op.inputs[2] if len(op.inputs) > 2 else None
            g = materialize(gradient, op.out, "output grad")
            dtype = g.dtype if isinstance(g, _Buf) else op.out.dtype
            # linear's weight gradient comes first; addmm's (GPT-2's Conv1D, weight as mat2) follows its
            # derivative's order: mat1 (the input), then mat2 (the weight).
            if recomputed:
                matmuls = [(weight, "mm grad weight", {g} | read_of(x)), (x, "mm grad input", {g} | read_of(weight))]
            else:
                matmuls = [(weight, "mm grad weight", {g, id(base(x))}), (x, "mm grad input", {g, id(base(weight))})]
            for target, name, reads in (matmuls[::-1] if op.name == "addmm" else matmuls):
                if target.requires_grad:
                    buf = _Buf(target.elems, dtype, name)
                    kernel([buf], reads)
                    extern_grad(target, buf)
            if bias is not None and bias.requires_grad:
                buf = _Buf(bias.elems, dtype, "bias grad")
                kernel([buf], {g})
                extern_grad(bias, buf)
            continue
        if op.name in ("bmm", "flash"):
            g = materialize(gradient, op.out, "output grad")
            sources = [t for t in op.inputs if t.requires_grad]
            if op.name == "bmm":
                sources.reverse()  # MmBackward computes the second operand's gradient first
            dtype = g.dtype if isinstance(g, _Buf) else op.out.dtype
            bufs = [_Buf(t.elems, t.dtype if op.name == "flash" else dtype, f"{op.name} grad") for t in sources]
            kernel(bufs, {g} | saved_reads(op))
            for source, buf in zip(sources, bufs):
                extern_grad(source, buf)
            continue
        if op.name in SCATTERED:
            # The gradient of a gather is scattered into zeros of the source's size: index_put, a kernel of its own
            # whose inputs (the zeros, the values) exist in memory.
            g = materialize(gradient, op.out, "output grad")
            dtype = g.dtype if isinstance(g, _Buf) else op.out.dtype
            zeros = _Buf(op.inputs[0].elems, dtype, "scatter zeros")
            kernel([zeros], set())
            buf = _Buf(op.inputs[0].elems, dtype, "scatter grad")
            kernel([buf], {g, zeros} | saved_reads(op))
            extern_grad(op.inputs[0], buf)
            continue
        # Pointwise ops and reductions: fused; their gradient reads what they saved (as recomputed from the cut).
        read = {gradient} | saved_reads(op)
        for index, source in enumerate(op.inputs):
            passes = op.name in PASS_THROUGH and (index == 0 or op.name != "sub") and source.elems == op.out.elems \
                and source.dtype == op.out.dtype
            if not passes and source.requires_grad and id(base(source)) in own and source.elems != op.out.elems \
                    and op.name not in REDUCTIONS:
                # A broadcast operand's gradient is a reduction over what it was broadcast to: its kernel runs
                # here, while what it reads is alive anyway.
                buf = _Buf(source.elems, source.dtype, "reduced grad")
                kernel([buf], read)
                flow(source, _Expr(set(), buf))
                continue
            flow(source, gradient if passes else _Expr(set(read)))  # one expression per input: each its own values
    for root, gradient in external.values():
        if gradient.buf is not None and isinstance(gradient.buf, _Buf) and gradient.buf.dtype == root.dtype:
            plan.outputs[id(root)] = gradient.buf
            continue
        buf = _Buf(root.elems, root.dtype, f"{root.name or 'input'} grad")
        kernel([buf], {gradient})
        plan.outputs[id(root)] = buf
    # Saved tensors no kernel reads (a cut larger than needed) are released with the node.
