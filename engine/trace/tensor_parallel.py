"""Tensor parallelism with sequence parallelism traced for one rank at the real world size, on fake tensors.

The model is split with DTensor's `parallelize_module` by torchtitan's Llama plan (parallelize_llama's
`apply_tp`), on the Hugging Face module names:

- embed_tokens: RowwiseParallel(input Replicate, output Shard(1)): the vocabulary sharded, the output
  reduce-scattered onto the sequence;
- input_layernorm, post_attention_layernorm, the final norm: SequenceParallel (each rank normalises its
  1/tp of the tokens);
- self_attn and mlp: their input all-gathered from Shard(1) to Replicate (PrepareModuleInput);
- q_proj, k_proj, v_proj, gate_proj, up_proj: ColwiseParallel (heads and the intermediate size sharded; Qwen2's
  q/k/v biases with them);
- Qwen3's q_norm and k_norm: SequenceParallel(sequence_dim=2) as in torchtitan's Qwen3 plan: each rank normalises
  its own heads, the weights replicated and their gradients all-reduced;
- OLMo 2's q_norm and k_norm, over every head at once: OLMo-core's plan (q_proj and k_proj's outputs kept as
  DTensors and redistributed onto the sequence, the norm SequenceParallel over the whole width, its output
  redistributed back onto the heads), its post-attention and post-MLP norms SequenceParallel with a local output;
- Phi-3's fused qkv_proj and gate_up_proj: ColwiseParallel with the rows reordered rank-major first, so that each
  rank's contiguous block is its own q, k and v heads and its share of gate and of up (Megatron-LM's and vLLM's
  fused parallel linears); a plain Colwise cut of [q; k; v] would hand rank 0 all of q and part of k;
- o_proj, down_proj: RowwiseParallel(output Shard(1)): reduce-scattered back onto the sequence;
- lm_head: ColwiseParallel(input Shard(1), output Shard(-1)) with loss parallel: the logits stay sharded
  over the vocabulary and the cross-entropy runs under `loss_parallel()` (torchtitan's default);
- Mixtral's, Qwen3-MoE's, gpt-oss's and DeepSeek-V3's MoE blocks in place of the MLP: torchtitan's MoE plan with
  TP and no expert parallelism (memtui.engine.trace.moe_parallel): the block's input all-gathered, the router replicated,
  the experts' stacked weights sharded on the intermediate dimension and run by transformers' own experts forward
  on the local shards, the partial output reduce-scattered onto the sequence; gpt-oss's attention sinks sharded
  with the heads; DeepSeek-V3's shared experts Colwise/Rowwise, their partial output summed with the routed
  experts', and its latent attention as torchtitan's DeepSeek-V3 plan (q_a_proj, kv_a_proj_with_mqa and their
  norms replicated, q_b_proj/q_proj and kv_b_proj Colwise).

GPT-2 gets Megatron-LM's GPT plan on transformers' Conv1D instead (memtui.engine.trace.tensor_parallel_gpt2): c_attn
and c_fc column-parallel (the Conv1D weight's Shard(1), c_attn's [q; k; v] columns reordered rank-major as Phi-3's
rows are), c_proj row-parallel (the weight's Shard(0), the bias replicated) reduce-scattered onto the sequence, ln_1,
ln_2 and ln_f SequenceParallel, wte vocabulary-sharded and all-reduced, wpe replicated, the summed embeddings
scattered onto the sequence before the dropout (Megatron-LM's LanguageModelEmbedding with learned positions), the
tied head with loss parallel.

With peft's LoRA (every family above), each Colwise, Rowwise and SequenceParallel style becomes NVIDIA NeMo
Automodel's LoRA-aware twin on peft's layers (memtui.engine.trace.tensor_parallel_lora): the adapters sharded with
their base layers, lora_A's output all-gathered on the Colwise ones, the norms left frozen (OLMo 2's whole-width
q/k norms too); a fused layer's lora_B rows reordered rank-major with its base rows (Phi-3, GPT-2's c_attn).

Rotary positions are computed for the whole sequence (the model sees 1/tp of it after the embedding), as
torchtitan precomputes them. With data-parallel ranks too, the mesh is 2-D (dp, tp) and FSDP2 shards over dp
(ZeRO-2/3) as in torchtitan (with `--offload optimizer+params` under its CPUOffloadPolicy, torchtitan's
enable_cpu_offload: the DTensor shards, their gradients and the optimizer step on the host), or 3-D (dp_replicate, dp_shard, tp) for HSDP; with DDP (ZeRO-0/1) the parameters are
made local by PyTorch's _pre_dp_module_transform and DDP runs over the dp group (memtui.engine.trace.parallel). The collectives are the fake backend's no-ops; every buffer they write into is
allocated as on a GPU and seen by the tracker.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch

from memtui.engine.estimator.layout import tensor_parallel_refusal
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.trace.moe_parallel import (
    attention_sinks_plan,
    is_moe_block,
    latent_attention_plan,
    moe_block_plan,
    moe_traced_lines,
)
from memtui.engine.trace.tensor_parallel_lora import LORA_TRACED_LINE, fused_adapter_rows, lora_aware
from memtui.engine.trace.parallel import DataParallel, record_stepped_gradients, tensor_data_lines, tensor_data_meshes
from memtui.engine.trace.tracker import MemoryLog, MemoryTracker

__all__ = ["TensorParallel", "apply_tensor_parallel", "tensor_parallel", "tensor_parallel_refusal"]


class TensorParallel:
    """run_fake_steps' hooks for one rank of a tensor-parallel job (with FSDP2 over dp when dp > 1)."""

    def __init__(self, config: TrainingConfig, num_layers: int, tp_mesh, dp_mesh) -> None:
        self.config = config
        self.tp_mesh = tp_mesh
        self.data = DataParallel(config, num_layers, dp_mesh) if dp_mesh is not None else None
        self.traced = [f"tensor parallel (traced): DTensor parallelize_module at tp {config.tp} (rank 0 of a fake "
                       "process group), torchtitan's Llama plan: Colwise q/k/v and gate/up, Rowwise o/down with "
                       "sequence parallel norms, vocabulary-sharded embedding and head, loss parallel"]
        if self.data is not None:
            self.traced += tensor_data_lines(config, self.data.traced)
        self.modelled: list[str] = []
        self.gradient_ids: set[int] = set()
        self.tracker: MemoryTracker | None = None
        self.restore: Callable[[], None] = lambda: None

    def wrap(self, model: torch.nn.Module, tracker: MemoryTracker) -> torch.nn.Module:
        self.tracker = tracker
        apply_tensor_parallel(model, self.tp_mesh)
        model_type = getattr(model.config, "model_type", "")
        if model_type == "phi3":
            self.traced.insert(1, "Phi-3's fused projections: Colwise qkv_proj and gate_up_proj with their rows "
                                  "reordered rank-major (each rank its own q, k and v heads and its share of gate "
                                  "and up, as Megatron-LM's and vLLM's fused parallel linears shard them)")
        if model_type == "olmo2":
            self.traced.insert(1, "OLMo 2's whole-width q_norm and k_norm as OLMo-core's plan runs them: the "
                                  "projections' outputs redistributed onto the sequence (DTensor's all-to-all), "
                                  "normalised over every head there, redistributed back; the post-attention and "
                                  "post-MLP norms sequence parallel")
        if model_type == "gpt2":
            self.traced[0] = (f"tensor parallel (traced): DTensor parallelize_module at tp {self.config.tp} (rank 0 of a "
                              "fake process group), Megatron-LM's GPT-2 plan on transformers' Conv1D: column-parallel "
                              "c_attn (its q, k and v columns reordered rank-major) and c_fc, row-parallel c_proj "
                              "reduce-scattered onto the sequence, sequence parallel ln_1, ln_2 and ln_f; the "
                              "vocabulary-sharded wte all-reduced, the replicated wpe added on the whole sequence and "
                              "the sum scattered onto it before the dropout; the tied head with loss parallel")
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside peft's wrapper
        self.traced[1:1] = moe_traced_lines(causal)
        if any(hasattr(module, "lora_A") for module in causal.modules()):
            self.traced.insert(1, LORA_TRACED_LINE)
        self.restore = whole_sequence_masks(getattr(causal, "transformer", None) or causal.model, ranks=self.config.tp)
        if self.data is not None:
            with _meshes_made_real():  # FSDP2 joins the dp and tp meshes; DDP runs on the dp group's local shards
                return self.data.wrap(model, tracker)
        return model

    def shard_optimizer(self, model: torch.nn.Module, optimizer):
        if self.data is not None:
            return self.data.shard_optimizer(model, optimizer)
        record_stepped_gradients(model, optimizer, self.tracker, self.gradient_ids)
        return optimizer

    def watching(self, tracker: MemoryTracker) -> contextlib.AbstractContextManager:
        from torch.distributed.tensor.parallel import loss_parallel

        stack = contextlib.ExitStack()
        stack.enter_context(loss_parallel())
        stack.enter_context(_WaitReturnsItsInput())
        stack.enter_context(_all_to_all_as_on_a_gpu())
        if self.data is not None:
            stack.enter_context(self.data.watching(tracker))
        return stack

    def relabel(self, log: MemoryLog) -> None:
        if self.data is not None:
            self.data.relabel(log)
        for alloc_id in self.gradient_ids:
            log.allocations[alloc_id].category = "gradients"


class _WaitReturnsItsInput(torch.utils._python_dispatch.TorchDispatchMode):
    """A functional collective's wait_tensor returns the very tensor it waits on (the kernel's schema aliases
    it); FakeTensorMode makes a new one, which would count every all-gather's and reduce-scatter's output twice."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.wait_tensor.default:
            source = args[0]
            return getattr(source, "elem", source) if type(source).__name__ == "AsyncCollectiveTensor" else source
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _meshes_made_real() -> Iterator[None]:
    """FSDP2 over a TP-sharded parameter joins the dp and tp meshes (DeviceMesh._concatenate); the new mesh's few
    rank integers must be real (its coordinate is read with nonzero()), as when the meshes were made."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh._concatenate

    def concatenate(device_mesh_list):
        with unset_fake_temporarily():
            return original(device_mesh_list)

    DeviceMesh._concatenate = staticmethod(concatenate)
    try:
        yield
    finally:
        DeviceMesh._concatenate = staticmethod(original)


_MASK_FACTORIES = ("create_causal_mask", "create_sliding_window_causal_mask")


def whole_sequence_masks(inner: torch.nn.Module, ranks: int = 1) -> Callable[[], None]:
    """Make the decoder's attention masks for the whole sequence; returns what undoes it.

    transformers sizes a mask by `inputs_embeds.shape[1]`, and under sequence parallelism the embedding hands each
    rank 1/tp of the tokens: eager attention (and SDPA with a sliding-window mask) would get a (s/tp)^2 mask for
    (s x s) scores. The model module's mask factories are wrapped for the trace to see a whole-length view of the
    embeddings (no allocation), as the rotary positions already cover the whole sequence. A model that does not
    hand the factories its positions (gpt-oss) gets `ranks` times its local tokens."""
    module = sys.modules[type(inner).__module__]
    originals = {name: getattr(module, name) for name in _MASK_FACTORIES if hasattr(module, name)}

    def whole(factory: Callable) -> Callable:
        def make(*args, **kwargs):
            embeds, positions = kwargs.get("inputs_embeds"), kwargs.get("position_ids")
            if embeds is None:
                return factory(*args, **kwargs)
            length = positions.shape[-1] if positions is not None else embeds.shape[1] * ranks
            if length != embeds.shape[1]:
                kwargs["inputs_embeds"] = embeds[:, :1].expand(embeds.shape[0], length, *embeds.shape[2:])
            return factory(*args, **kwargs)

        return make

    for name, factory in originals.items():
        setattr(module, name, whole(factory))

    def restore() -> None:
        for name, factory in originals.items():
            setattr(module, name, factory)

    return restore


def apply_tensor_parallel(model: torch.nn.Module, mesh, *, embedding: bool = True, head: bool = True) -> None:
    """torchtitan's apply_tp for Llama (and Qwen3's q/k norms), on transformers' module names, sequence parallel
    and loss parallel. A pipeline stage without the embedding (`embedding=False`: it gets the rank's 1/tp of the
    hidden states, as the stage before sends them) or without the final norm and head (`head=False`) has no plan
    for them, as torchtitan's apply_tp skips a stage's missing modules."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if model.config.model_type == "gpt2":
        from memtui.engine.trace.tensor_parallel_gpt2 import apply_gpt2_tensor_parallel

        causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside peft's wrapper
        apply_gpt2_tensor_parallel(causal, mesh, embedding=embedding, head=head)
        model.register_forward_hook(_local_loss)
        return
    outer = model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside peft's LoRA wrapper
    inner = model.model
    ends = {}
    if embedding:
        ends["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if head:
        ends["model.norm"] = SequenceParallel()
        ends["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, mesh, lora_aware(model, ends))
    if model.config.tie_word_embeddings and embedding and head:
        # parallelize_module gave the embedding and the head a DTensor each; both are Shard(0) over the vocabulary,
        # so one parameter serves both again, tied after the plan as torchtitan ties Qwen3's and Llama's weights.
        model.lm_head.weight = inner.embed_tokens.weight
    for layer in inner.layers:
        post_norms = not hasattr(layer, "input_layernorm")  # OLMo 2: the attention's and MLP's outputs normalised
        whole_width = post_norms and hasattr(layer.self_attn, "q_norm")  # OLMo 2's q/k norms cover every head
        if hasattr(layer.self_attn, "q_norm") and not whole_width:
            # Qwen3: each head's query and key normalised, as torchtitan's plan does: the projections' local heads
            # taken as Shard(2) of (batch, sequence, heads, head_dim)
            parallelize_module(layer, mesh, lora_aware(layer, {
                name: SequenceParallel(sequence_dim=2, use_local_output=True)
                for name in ("self_attn.q_norm", "self_attn.k_norm")}))
        fused = hasattr(layer.self_attn, "qkv_proj")  # Phi-3: fused q/k/v and gate/up projections
        if fused:
            _rank_major_fused_rows(layer, tp=mesh.size())
        # Gemma-2 and Gemma-3 normalise the attention's and the MLP's outputs too (post_attention_layernorm runs on
        # the attention's output there, pre/post_feedforward_layernorm around the MLP), OLMo 2 only those, each on
        # the rank's 1/tp tokens; an output norm's result joins the residual as a local tensor, as o_proj's does.
        sandwich = hasattr(layer, "pre_feedforward_layernorm")
        norms = ({"input_layernorm": SequenceParallel(),
                  "post_attention_layernorm": SequenceParallel(use_local_output=True),
                  "pre_feedforward_layernorm": SequenceParallel(),
                  "post_feedforward_layernorm": SequenceParallel(use_local_output=True)}
                 if sandwich else {"post_attention_layernorm": SequenceParallel(use_local_output=True),
                                   "post_feedforward_layernorm": SequenceParallel(use_local_output=True)}
                 if post_norms else {"post_attention_layernorm": SequenceParallel(),
                                     "input_layernorm": SequenceParallel()})
        if whole_width:
            # OLMo 2 normalises q and k over every head at once (q_norm(q_proj(x))), which a rank holding 1/tp of the
            # heads cannot do alone. As OLMo-core's plan does: the projection's output (heads sharded) redistributed
            # onto the sequence (an all-to-all), the norm run whole-width on the rank's 1/tp of the tokens
            # (SequenceParallel, its weight replicated), and its output redistributed back onto the heads.
            parallelize_module(layer, mesh, lora_aware(layer, {
                "self_attn.q_proj": ColwiseParallel(use_local_output=False),
                "self_attn.k_proj": ColwiseParallel(use_local_output=False),
                "self_attn.q_norm": _sequence_parallel_onto_heads(),
                "self_attn.k_norm": _sequence_parallel_onto_heads()}))
        parallelize_module(layer, mesh, lora_aware(layer, {
            **norms,
            # transformers passes the hidden states to self_attn by keyword, to mlp by position
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            **(latent_attention_plan(layer.self_attn) if hasattr(layer.self_attn, "kv_b_proj") else
               {"self_attn.qkv_proj": ColwiseParallel()} if fused else {"self_attn.v_proj": ColwiseParallel()}
               if whole_width else {
                "self_attn.q_proj": ColwiseParallel(),
                "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel()}),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            **(moe_block_plan(layer.mlp, mesh.size()) if is_moe_block(layer.mlp) else {
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                **({"mlp.gate_up_proj": ColwiseParallel()} if fused else {
                    "mlp.gate_proj": ColwiseParallel(),
                    "mlp.up_proj": ColwiseParallel()}),
                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))}),
        }))
        parallelize_module(layer, mesh, attention_sinks_plan(layer.self_attn))

    tp = mesh.size()

    def whole_sequence_positions(_module, args, kwargs):
        # After the embedding each rank holds 1/tp of the tokens; rotary positions must cover the whole sequence
        # (a later pipeline stage gets the rank's 1/tp of the hidden states as its input).
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if kwargs.get("position_ids") is None:
            if ids is not None:
                kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            elif embeds is not None:
                kwargs["position_ids"] = torch.arange(embeds.shape[1] * tp, device=embeds.device).unsqueeze(0)
        return args, kwargs

    inner.register_forward_pre_hook(whole_sequence_positions, with_kwargs=True)
    outer.register_forward_hook(_local_loss)



def _local_loss(_module, _args, output):
    """Loss parallel leaves a replicated DTensor loss; the step reads and scales it as a plain tensor (a view)."""
    loss = getattr(output, "loss", None)
    if loss is not None and hasattr(loss, "to_local"):
        output.loss = loss.to_local()
    return output


def _sequence_parallel_onto_heads():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import SequenceParallel

    class SequenceParallelOntoHeads(SequenceParallel):
        """SequenceParallel whose output is redistributed from the sequence onto the last dimension (the heads) and
        handed on local: OLMo-core's SequenceParallel(output_layouts=Shard(2)) for its whole-width q/k norms."""

        @staticmethod
        def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
            return outputs.redistribute(placements=(Shard(2),)).to_local()

    return SequenceParallelOntoHeads()


@contextlib.contextmanager
def _all_to_all_as_on_a_gpu() -> Iterator[None]:
    """DTensor redistributes between two sharded dimensions with its `_dtensor.shard_dim_alltoall` op, except on a
    CPU mesh, where gloo has no all-to-all and it all-gathers the whole tensor and copies out a chunk instead; the
    trace's mesh is a CPU one, so it is pointed at the op NCCL runs (its fake kernel: the output only)."""
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.tensor import placement_types

    original = placement_types.shard_dim_alltoall

    def shard_dim_alltoall(input, gather_dim, shard_dim, mesh, mesh_dim):
        group = funcol._resolve_group((mesh, mesh_dim))
        return torch.ops._dtensor.shard_dim_alltoall(input, gather_dim, shard_dim,
                                                    funcol._group_or_group_name(group))

    placement_types.shard_dim_alltoall = shard_dim_alltoall
    try:
        yield
    finally:
        placement_types.shard_dim_alltoall = original


def _rank_major_fused_rows(layer: torch.nn.Module, tp: int) -> None:
    """Phi-3's fused projections sharded as Megatron-LM and vLLM shard them (QKVParallelLinear,
    MergedColumnParallelLinear): each rank holds its own heads of q, k and v, and its share of gate and of up.
    ColwiseParallel cuts a weight's rows into tp contiguous blocks, which on [q; k; v] would hand rank 0 all of
    q and part of k; the rows are reordered rank-major first ([q_0; k_0; v_0; q_1; k_1; v_1; ...]) so that each
    contiguous block is one rank's parts, and the attention slices its local qkv output by its local head counts
    (Phi3Attention reads them from config.num_attention_heads and num_key_value_heads)."""
    import copy

    attention, mlp = layer.self_attn, layer.mlp
    heads, kv_heads = attention.config.num_attention_heads, attention.num_key_value_heads
    head_dim = attention.head_dim
    for fused, parts in ((attention.qkv_proj, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]),
                         (mlp.gate_up_proj, [mlp.gate_up_proj.out_features // 2] * 2)):
        # peft's lora.Linear: the base layer's rows, and each lora_B's with them (the same parts)
        for linear in (getattr(fused, "base_layer", fused), *fused_adapter_rows(fused)):
            _reorder_rows(linear, parts, tp)
    local = copy.copy(attention.config)  # this rank's heads; the module's config only, the model's stays whole
    local.num_attention_heads = heads // tp
    attention.config = local
    attention.num_key_value_heads = kv_heads // tp


def _reorder_rows(linear: torch.nn.Linear, parts: list[int], tp: int) -> None:
    """The rows of `linear` (the parts stacked, each `parts[i]` rows) reordered rank-major: every part's first
    1/tp, then every part's second 1/tp, and so on (with its bias)."""
    starts = [sum(parts[:index]) for index in range(len(parts))]
    order = torch.cat([torch.arange(start + rank * size // tp, start + (rank + 1) * size // tp)
                       for rank in range(tp) for start, size in zip(starts, parts)])
    with torch.no_grad():
        for name in ("weight", "bias"):
            tensor = getattr(linear, name, None)
            if tensor is not None:
                setattr(linear, name, torch.nn.Parameter(tensor.index_select(0, order),
                                                         requires_grad=tensor.requires_grad))


@contextlib.contextmanager
def tensor_parallel(config: TrainingConfig, num_layers: int) -> Iterator[TensorParallel]:
    """Rank 0 of a fake process group of config.dp x config.tp ranks, torn down on the way out."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; the trace needs its own")
    world = config.dp * config.tp
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    parallel: TensorParallel | None = None
    try:
        if config.dp > 1:
            parallel = TensorParallel(config, num_layers, *tensor_data_meshes(config))
            yield parallel
        else:
            parallel = TensorParallel(config, num_layers, init_device_mesh("cpu", (config.tp,)), None)
            yield parallel
    finally:
        if parallel is not None:
            parallel.restore()
        dist.destroy_process_group()
