"""--compile: each decoder layer through torch.compile's training path, as torchtune and torchtitan compile it.

torchtune (training.compile_model) and torchtitan (apply_compile) compile every decoder layer on its own. What
that changes in memory is decided in two places: AOTAutograd's min-cut partitioner chooses what the forward saves
for backward (inductor's choice: `torch._inductor.compile_fx.partition_fn`, its joint-graph passes then
`min_cut_rematerialization_partition(compiler="inductor")`: cheap pointwise work is recomputed in backward,
matmul and attention outputs are kept), and inductor's fusion decides which intermediates ever exist.

The trace (`partition_layers`) runs that for real on fake tensors, without generating code: AOTAutograd traces
each layer with inductor's decompositions, the partitioner splits the joint graph, and the two graphs run node
by node. Inductor's fusion is modelled in how they run: an op that inductor fuses into its consumer (pointwise
ops, reductions, views, cat, clone, casts; the partitioner's fusible set) gets no allocation unless its value
must exist: a graph output (saved for backward, the layer's output, a gradient) or an input of a kernel inductor
calls instead of generating (matmuls, attention). Buffers inductor reuses in place and its own workspaces are not
modelled. The live run (`inductor_layers`) calls torch.compile for real on CUDA.

Dynamo is not run in the trace: a layer is traced by AOTAutograd directly, so graph breaks are not modelled
(both stacks compile a layer as one graph).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

Untracked = Callable[[], contextlib.AbstractContextManager]


def untraced_compile(config, *, parallel: bool) -> str:
    """Why the trace runs a --compile config eagerly ("" when it traces compile); `parallel`: the trace wraps
    the model for data or tensor parallelism."""
    # FSDP2 (--zero 3) around compiled layers is traced for torchtitan's setup (selective-op compiled into each
    # block, then fully_shard): checked against the estimate there only
    if parallel and not (config.checkpointing == "selective-op" and config.zero == 3 and config.tp == 1
                         and config.pp == 1):
        return "data or tensor parallelism"
    if config.quant != "none":
        return f"{config.quant} layers (bitsandbytes' replicas)"
    if config.checkpointing == "selective":
        return "selective checkpointing"  # its policy's storage around a compiled layer is not traced yet
    return ""


def decoder_layer_list(model, layers: int):
    """The ModuleList of decoder layers: the one of that length holding the most parameters."""
    import torch

    from memtui.engine.errors import InputError

    best, best_params = None, -1
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = module, params
    if best is None:
        raise InputError("model", "found no list of decoder layers in the built module")
    return best


def inductor_layers(model, layers: int) -> None:
    """The live run: torch.compile (inductor) of each decoder layer and of the loss, as torchtune and torchtitan do."""
    import torch

    for layer in decoder_layer_list(model, layers):
        layer.compile()
    compiled_losses(model, torch.compile)


def compiled_losses(model, compile_function: Callable[[Callable], Callable]) -> None:
    """The loss under --compile, each compiled by `compile_function` (a function -> its compiled twin).

    torchtune's recipes compile CEWithChunkedOutputLoss.compute_cross_entropy, one chunk's upcast and
    cross-entropy, and not the chunking (training/_compile.py compile_loss, at 1814feb17; its recipes call it
    when `compile: True`); torchtitan compiles its whole cross-entropy, upcast included ("loss" is in
    compile.components by default: components/loss.py _maybe_compile, at b5bcd76), as the Trainer's
    torch_compile does with the model's own loss inside its forward. So: the chunked loss's
    compute_cross_entropy per chunk, and transformers' loss_function (ForCausalLMLoss: upcast, shift,
    cross-entropy) as one graph. LitGPT's chunked loss (--loss-dtype compute) and Liger's fused kernel stay eager."""
    from memtui.engine.torchside.build import compute_cross_entropy

    if getattr(model, "memtui_eager_loss", False):  # --eager-loss: the layers alone
        return
    mode, _chunks, dtype = getattr(model, "memtui_loss", ("standard", 1, "fp32"))
    if mode == "chunked" and dtype == "fp32":
        model.memtui_cross_entropy = compile_function(compute_cross_entropy)
    elif mode == "standard":
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        causal.loss_function = compile_function(causal.loss_function)


def partition_layers(model, layers: int, untracked: Untracked) -> PartitionedLayers:
    """The trace: each decoder layer's forward through AOTAutograd and inductor's partitioner (no code
    generated); `untracked()` hides the allocations of what inductor would fuse (see the module's docstring)."""
    compiled = PartitionedLayers(untracked, getattr(model, "memtui_checkpointing", "none"))
    for layer in decoder_layer_list(model, layers):
        layer.forward = functools.partial(compiled.checkpointed_call, layer, _undecorated_forward(layer))
    compiled_losses(model, compiled.function)
    return compiled


def _undecorated_forward(layer):
    """The layer's forward without transformers' checkpointing decorator (GradientCheckpointingLayer), bound.

    The checkpoint then runs around the compiled layer, as torch.compile's checkpoint operator has the
    partitioner save only the layer's inputs and recompute the rest in backward."""
    forward = type(layer).forward
    if forward.__code__.co_name == "forward_with_checkpointing":
        forward = forward.__wrapped__
    return functools.partial(forward, layer)


class PartitionedLayers:
    """One AOTAutograd function per distinct layer signature, shared by the layers alike (as dynamo shares one
    graph across identical layers); the parameters are the graph's inputs."""

    def __init__(self, untracked: Untracked, checkpointing: str = "none") -> None:
        self.untracked = untracked
        self.checkpointing = checkpointing  # --checkpointing: "selective-op" is traced inside the graph
        self._functions: dict[Any, Callable] = {}
        self.graphs: list[tuple[str, Any]] = []  # ("forward" | "backward", GraphModule), as partitioned

    def function(self, function: Callable) -> Callable:
        """A function of tensors (the loss) as one graph: a module without parameters stands for it."""
        import torch

        class Function(torch.nn.Module):
            pass

        holder = Function()  # a class of its own: the graph cache keys on it
        return functools.partial(self.call, holder, function)

    def checkpointed_call(self, layer, forward, *args, **kwargs):
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            # What transformers' checkpointing decorator does to the arguments (no cache under checkpointing).
            if kwargs.get("past_key_values") is not None:
                kwargs["past_key_values"] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if self.checkpointing == "selective-op":
                # torchtitan compiles the checkpoint-wrapped block: the checkpoint is traced into the graph
                return self.call(layer, functools.partial(_checkpoint_in_graph, forward), *args, **kwargs)
            # Compiled before the checkpoint starts: traced inside it, the graph would carry its recompute tags.
            self._compiled(layer, forward, args, kwargs)
            return layer._gradient_checkpointing_func(functools.partial(self.call, layer, forward, **kwargs), *args)
        return self.call(layer, forward, *args, **kwargs)

    def call(self, layer, forward, *args, **kwargs):
        function, inputs = self._compiled(layer, forward, args, kwargs)
        return function(*inputs)

    def _compiled(self, layer, forward, args, kwargs):
        """The function for this call's signature (traced and partitioned on its first call) and its inputs."""
        import torch
        from torch.utils._pytree import tree_flatten

        leaves, spec = tree_flatten((args, kwargs))
        tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        state = dict(layer.named_parameters())
        state.update(layer.named_buffers())
        key = (type(layer), spec, _attention_kind(layer),
               tuple(_meta(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves),
               tuple((name, _meta(value)) for name, value in state.items()),
               torch.is_grad_enabled(), _autocast_state())
        inputs = list(state.values()) + [leaves[i] for i in tensor_at]
        function = self._functions.get(key)
        if function is None:
            # Tracing makes fake tensors of its own: none of them is an allocation of the step.
            with self.untracked():
                function = self._compile(layer, forward, leaves, spec, tensor_at, list(state), inputs)
            self._functions[key] = function
        return function, inputs

    def _compile(self, layer, forward, leaves, spec, tensor_at, names, inputs):
        import torch
        from torch._functorch.aot_autograd import aot_module_simplified
        from torch._inductor.compile_fx import partition_fn
        from torch._guards import detect_fake_mode
        from torch._inductor.decomposition import select_decomp_table
        from torch._inductor.virtualized import V
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.nn.utils.stateless import _reparametrize_module
        from torch.utils._pytree import tree_flatten, tree_unflatten

        count = len(names)
        leaves = [None if index in tensor_at else leaf for index, leaf in enumerate(leaves)]  # keep no tensor alive
        out_spec: list = [None]  # the layer's output structure, known once traced

        class LayerFunction(torch.nn.Module):
            """The layer as a function of its parameters and tensor arguments (no state of its own)."""

            def forward(self, *flat):
                values = list(leaves)
                for index, tensor in zip(tensor_at, flat[count:]):
                    values[index] = tensor
                args, kwargs = tree_unflatten(values, spec)
                with _reparametrize_module(layer, dict(zip(names, flat[:count]))):
                    out = forward(*args, **kwargs)
                flat_out, out_spec[0] = tree_flatten(out)
                return tuple(flat_out)

        def compiler(kind):
            def compile_graph(graph, _example_inputs):
                self.graphs.append((kind, graph))
                return fused_runner(graph, self.untracked)
            return compile_graph

        # Stand-ins for the example inputs: AOTAutograd keeps what it traced with, which must not keep this step's
        # tensors alive.
        examples = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).requires_grad_(t.requires_grad)
                    for t in inputs]
        # Inductor's joint-graph passes (dropout's seeds) make tensors in the fake mode compile_fx sets.
        fake_mode = detect_fake_mode(examples)
        if fake_mode is None:  # real tensors (tests): AOTAutograd must trace in that same mode (the loss's passes)
            fake_mode = FakeTensorMode()
            examples = [fake_mode.from_tensor(t) for t in examples]
        parameters = len(dict(layer.named_parameters()))

        def partition(graph, joint_inputs, **kwargs):
            # Dynamo marks a module's parameters static inputs (frontend_utils._try_get_metadata_from_dynamo), which
            # the partitioner saves for free (config.treat_parameters_as_free_to_save): a linear's weight is saved
            # as the Parameter itself, not as its transpose. Activation offloading's pack hook tells the two apart
            # (a Parameter stays on the device). Traced without dynamo, the indices are given here.
            kwargs["static_lifetime_input_indices"] = list(range(parameters))
            return partition_fn(graph, joint_inputs, **kwargs)

        with V.set_fake_mode(fake_mode):
            compiled = aot_module_simplified(LayerFunction(), examples, fw_compiler=compiler("forward"),
                                             bw_compiler=compiler("backward"), partition_fn=partition,
                                             decompositions=select_decomp_table())

        def run(*flat):
            return tree_unflatten(list(compiled(*flat)), out_spec[0])

        return run


def _checkpoint_in_graph(forward, *args, **kwargs):
    """torchtitan's op-level selective checkpoint of a layer, as torch.compile traces it (torchtitan applies the
    checkpoint wrapper, then compiles each wrapped block): what Dynamo's tag_activation_checkpoint runs under
    AOTAutograd (torch/_higher_order_ops/wrap.py, tag_activation_checkpoint_impl). Traced, the policy's dispatch
    mode tags each node of the joint graph MUST_SAVE or PREFER_RECOMPUTE (utils/checkpoint.py,
    _CachingTorchDispatchMode) and caches every output, so the joint graph holds no recompute of its own; the
    min-cut partitioner then saves what is MUST_SAVE and always recomputes what is PREFER_RECOMPUTE
    (partitioners.py solve_min_cut: must_recompute)."""
    import torch.fx.traceback as fx_traceback
    from torch.utils.checkpoint import checkpoint

    from memtui.engine.torchside.build import selective_checkpoint_kwargs

    policy = selective_checkpoint_kwargs("selective-op")["context_fn"]

    def context_fn():
        forward_context, recompute_context = policy()
        forward_context.ac_graph_id = 1  # one region per graph
        return forward_context, recompute_context

    with fx_traceback.preserve_node_meta():
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, early_stop=False,
                          context_fn=context_fn, **kwargs)


def _meta(tensor) -> tuple:
    return (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.requires_grad)


def _attention_kind(layer) -> tuple:
    """What makes two layers of one class trace differently (sliding-window layers beside global ones)."""
    attention = getattr(layer, "self_attn", None)
    return tuple(repr(getattr(owner, name, None)) for owner in (layer, attention)
                 for name in ("attention_type", "sliding_window", "is_sliding"))


def _autocast_state() -> tuple:
    import torch

    return tuple((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda"))


# ---- inductor's fusion, as allocations ---------------------------------------------------------------------
def fused_nodes(graph) -> set:
    """The nodes of a partitioned graph whose values inductor never allocates: ops it generates code for
    (`_generated`) whose value is neither a graph output nor read by a kernel it calls instead (matmuls,
    attention, its fallbacks), and the views of such values."""
    import torch
    from torch._functorch.partitioners import get_default_op_list

    op_types = get_default_op_list()
    base: dict = {}  # node -> the node whose storage it views
    for node in graph.graph.nodes:
        base[node] = node
        if node.op == "call_function" and (op_types.is_view(node) or node.target is _getitem()):
            source = node.args[0] if node.args else None
            if isinstance(source, torch.fx.Node) and not _multi_output(source):
                base[node] = base[source]
    needed: set = set()
    for node in graph.graph.nodes:
        if node.op == "output":
            needed.update(base[value] for value in _flat_nodes(node.args))
        elif node.op == "call_function" and base[node] is node and not _generated(node):
            needed.update(base[value] for value in _flat_nodes((node.args, node.kwargs)))
    fused = set()
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        root = base[node]
        if root.op == "call_function" and root not in needed and _generated(root):
            fused.add(node)
    return fused


# Lowered by inductor, but into a kernel of their own whose output is a buffer (or called as a library kernel).
_EXTERN = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm", "convolution", "scatter", "scatter_add",
           "scatter_reduce", "index_put", "index_add", "sort", "topk", "cumsum", "cumprod")


def _generated(node) -> bool:
    """An op inductor generates (fusible) code for: it has a lowering that is not a fallback or an extern kernel."""
    import torch._inductor.lowering as lowering

    target = node.target
    if target is _getitem():
        return not _multi_output(node.args[0])
    packet = getattr(target, "overloadpacket", None)
    if packet is None or packet.__name__ in _EXTERN:
        return False
    return (target in lowering.lowerings or packet in lowering.lowerings) and target not in lowering.fallbacks \
        and packet not in lowering.fallbacks


def _getitem():
    import operator

    return operator.getitem


def _multi_output(node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, (tuple, list))


def _flat_nodes(value) -> list:
    import torch

    found: list = []
    torch.fx.node.map_arg(value, found.append)
    return found


def fused_runner(graph, untracked: Untracked):
    """Run a partitioned graph node by node (boxed: its inputs are freed at their last use, as inductor's code
    frees them), each fused node's value made without an allocation the tracker sees.

    A buffer read by fused ops lives until the kernel they are fused into has run (inductor's kernel reads it
    there), not only until the last fused op that names it."""
    import torch

    fused = fused_nodes(graph)
    nodes = list(graph.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    reads: dict = {}  # a fused node -> the unfused values its kernel reads
    last_use: dict = {}
    for node in nodes:
        direct = _flat_nodes((node.args, node.kwargs))
        effective = set()
        for value in direct:
            effective |= reads[value] if value in fused else {value}
            last_use[value] = position[node]
        if node in fused:
            reads[node] = effective
        else:
            for value in effective:
                last_use[value] = max(last_use.get(value, 0), position[node])
    release: dict[int, list] = {}
    for value, index in last_use.items():
        release.setdefault(index, []).append(value)

    class FusedInterpreter(torch.fx.Interpreter):
        def run_node(self, node):
            if node in fused:
                with untracked():
                    return super().run_node(node)
            return super().run_node(node)

    def run(args: list):
        interpreter = FusedInterpreter(graph, garbage_collect_values=False)
        env = dict(zip((node for node in nodes if node.op == "placeholder"), args))
        args.clear()
        interpreter.env = env
        interpreter.args_iter = iter(())
        for index, node in enumerate(nodes):
            if node.op == "output":
                return interpreter.graph.process_outputs(
                    torch.fx.node.map_arg(node.args[0], lambda value: env[value]))
            if node not in env:
                env[node] = interpreter.run_node(node)
            for value in release.get(index, ()):
                env.pop(value, None)
        return None

    run._boxed_call = True
    return run
