"""Pipeline parallelism traced for every rank at the real world size, on fake tensors.

Each pipeline rank is traced as rank r of torch's `fake` process group of `pp` ranks (two traces at a time: this
process and a forked one, _traced_in_two), running torch's own
pipelining code (torch.distributed.pipelining) on its stage of the model (under GPipe, which runs every rank alike,
once per stage shape: the middle ranks of as many layers share one trace, see _rank_role). A deep stage of a model
whose layers are alike is traced at a few layers and its log extended to the stage's layers, once a rank of each
kind of stage has rebuilt its step one layer deeper exactly (_StageExtension); under 1F1B most middle ranks' logs at
those layers are laid out from one middle rank's actions in their own order (memtui.engine.trace.schedule_compose),
once another rank's log laid out so was its traced one:

- the model is cut as torchtitan cuts it: the stage keeps its decoder layers, the first stage the embedding, the
  last the final norm and the head; the other stages get the hidden states (`inputs_embeds`) and return them;
- `PipelineStage` (static metadata: the micro-batch's hidden states in and out, the logits out of the last stage)
  and the schedule (`ScheduleGPipe`, `Schedule1F1B`, or `ScheduleInterleaved1F1B` with two stages per rank, r and
  r + pp) run `schedule.step(batch, target=labels, losses=..., return_outputs=False)` (torchtitan's call): the
  batch is split into `--microbatches` micro-batches, each forward and backward runs in the schedule's order, the
  last stage computes transformers' causal-LM loss per micro-batch as the schedule's loss_fn.

What the stage allocates is what torch's code allocates: each receive buffer is made by `_RecvInfo.allocate_buffer`
(`_make_tensor_from_meta`, an empty tensor of the metadata's shape) just before its receive (`get_fwd_recv_ops`,
`get_bwd_recv_ops`) and becomes the micro-batch's input (a leaf that requires grad) or its output's gradient;
`_ForwardChunkState` keeps each micro-batch's inputs, and its outputs until their send completes (the last stage's
until backward; a fake tensor's as a real one's, `_releasable_as_on_a_gpu`), the autograd graph keeps what the
layers save, and `backward_one_chunk` keeps the input gradients in `bwd_cache` until `get_bwd_send_ops` sends
them; the last stage's losses (the schedule's `_internal_losses`) keep their graphs, and with them each micro-batch's
received input, until the step ends. The fake backend's sends and receives are no-ops, so the received tensors'
contents are undefined, which fake tensors do not have anyway.

With data and/or tensor parallelism (FSDP2, DTensor) the job is built as torchtitan builds it: a DeviceMesh
(pp, dp, tp) of pp x dp x tp ranks ((pp, dp_replicate, dp_shard, tp) for HSDP), the rank traced being the first of
its pipeline position's (dp, tp) slice; each stage gets torchtitan's TP plan on its own modules (a later stage
receives, and sends, this rank's 1/tp of the tokens), then `fully_shard` per decoder layer and on the stage, and its
PipelineStage the pp sub-group. torch's pipelining runs each micro-batch's backward with FSDP2's gradient sync and
resharding after backward off, so the gradients accumulate unsharded until the stage's last backward
reduce-scatters them; with `--offload optimizer+params` every group is under CPUOffloadPolicy, as torchtitan's
enable_cpu_offload puts each model part (the shards on the host, each reduced shard copied there, the optimizers
stepping on the CPU: memtui.engine.trace.parallel.CPU_OFFLOAD). With --zero 0 or 1 the stage is wrapped in
DistributedDataParallel over the data-parallel group instead (memtui's DDP: memtui.engine.trace.parallel.ddp_wrap), which PipelineStage drives itself
(`backward_maybe_with_nosync`; beside tensor parallelism on the parameters PyTorch's `_pre_dp_module_transform`
makes local): every forward and all but the stage's last backward run under `no_sync`, so the
gradients accumulate in .grad and only the last backward copies them into the buckets and all-reduces them; DDP's
reducer needs the stage's live outputs, so each sent output is kept until its backward. ZeRO-1 wraps each stage's
optimizer in ZeroRedundancyOptimizer over the data-parallel group.

Interleaved 1F1B runs through `_PipelineScheduleRuntime`, which posts receives as early as the other ranks' sends
allow and waits for sends later than Schedule1F1B (a forward's after its backward, a backward's at the step's end);
the estimator follows the same lowered action list (memtui.engine.estimator.pipeline.rank_schedule).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass

import torch

from memtui.engine.estimator.layout import (MOE_TENSOR_PARALLEL_FAMILIES, pipeline_rank_stages, pipeline_refusal,
                                            pipeline_stage_layers, pipeline_stages_model)
from memtui.engine.model.architectures import ModelSpec, attention_layer_types
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.trace.fake_step import (STEPS, StepExtras, optimizer_state_tensors, quiet_libraries,
                                           tag_optimizer_states, traced_micro_batches, watch_model)
from memtui.engine.trace.parallel import (CPU_OFFLOAD, cpu_offload_copies, cpu_offload_lines, fsdp_storage_resizes,
                                         record_stepped_gradients, steps_on_the_host)
from memtui.engine.trace.tracker import MemoryLog, MemoryTracker, classify

__all__ = ["RankTrace", "pipeline_lines", "pipeline_refusal", "trace_pipeline"]


@dataclass
class RankTrace:
    rank: int
    stages: list[int]
    layers: int
    embedding: bool
    head: bool
    log: MemoryLog
    extras: StepExtras
    note: str = ""  # how the log was made, where it was not traced at every layer
    # (index of its first event, step, "F" or "B", micro-batch) of each action the schedule ran, in order
    actions: list = dataclasses.field(default_factory=list)


class _Stage(torch.nn.Module):
    """One pipeline stage of a transformers causal LM: token ids or hidden states in, hidden states or logits out.
    The forward runs under the step's autocast, as the whole model's forward does on one GPU."""

    def __init__(self, causal, *, first: bool, last: bool, autocast) -> None:
        super().__init__()
        self.model = _decoder(causal)
        self.lm_head = causal.lm_head if last else None
        self.loss = getattr(causal, "memtui_loss", ("standard", 1, "fp32"))
        # Gemma-2's final_logit_softcapping, which its causal LM's forward applies to the head's logits
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None) if last else None
        self.first = first
        self._autocast = autocast

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            if hasattr(self.model, "wpe"):
                hidden = _gpt2_stage(self.model, inputs, first=self.first)
            else:
                given = {"input_ids": inputs} if self.first else {"inputs_embeds": inputs}
                hidden = self.model(**given, use_cache=False).last_hidden_state
            if self.lm_head is None:
                return hidden
            output = _head_output(self.lm_head, hidden, self.loss)
            if self.softcap is not None and self.loss[0] == "standard":
                output = torch.tanh(output / self.softcap) * self.softcap
            return output


def _head_output(head, hidden: torch.Tensor, loss: tuple):
    """The last stage's output as --loss says (the model's `memtui_loss`, build_model's): the head's logits; under
    torchtune's chunked loss the head's output per sequence chunk (its model returns that list); under the fused
    linear cross-entropy the final norm's output, which the loss multiplies by the head's weight chunk by chunk."""
    mode, chunks, _dtype = loss
    if mode == "chunked":
        return tuple(head(part) for part in hidden.chunk(chunks, dim=1))
    return hidden if mode == "fused-linear" else head(hidden)


def _stage_loss(config: TrainingConfig, spec: ModelSpec, last_causal, tracker: MemoryTracker, autocast, scaler):
    """The schedule's loss_fn on the last stage, one micro-batch's output and labels: transformers' causal-LM loss,
    torchtune's CEWithChunkedOutputLoss on the chunked logits, or the fused linear cross-entropy (Liger's, in plain
    torch off CUDA) on the final norm's output and the head's weight; divided by the accumulation steps (the step's
    loss their mean, as torchtitan normalises over the whole step's tokens) and, under fp16, scaled by the GradScaler
    (the schedule runs backward on what it returns)."""
    from memtui.engine.torchside.build import chunked_logits_loss, fused_linear_loss, shifted_labels

    head = last_causal.get_output_embeddings()
    accumulated = traced_micro_batches(config)

    def loss_fn(output, labels):
        tracker.mark("loss")
        with autocast():
            if config.loss == "chunked":
                loss = chunked_logits_loss(list(output), shifted_labels(labels), config.loss_chunks)
            elif config.loss == "fused-linear":
                loss = fused_linear_loss(output, head.weight, labels)
            else:
                loss = last_causal.loss_function(logits=output, labels=labels, vocab_size=spec.vocab_size)
        if accumulated > 1:
            loss = loss / accumulated
        return scaler.scale(loss) if scaler is not None else loss

    return loss_fn


def _grad_scaler(config: TrainingConfig, tracker: MemoryTracker):
    """fp16 (16-mixed): the GradScaler of the single-GPU step on every pipeline rank. The last stage's loss_fn scales
    its losses, and every stage's gradients come out scaled, so every rank unscales its own before stepping (each
    holds the scale from the start, as ranks that share one loss scale do); the step is always taken (whether to skip
    it depends on found_inf's value, which fake tensors do not have)."""
    if config.precision != "16-mixed":
        return None
    scaler = torch.amp.GradScaler("cpu")
    scaler._maybe_opt_step = lambda optimizer, _state, *args, **kwargs: optimizer.step(*args, **kwargs)
    with tracker:
        scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    return scaler


def _decoder(causal) -> torch.nn.Module:
    """The causal LM's decoder: `model` (Llama layout), `transformer` (GPT-2); inside peft's LoRA wrapper, whose
    own `model` attribute is the causal LM."""
    base = causal.get_base_model() if hasattr(causal, "get_base_model") else causal
    return base.transformer if hasattr(base, "transformer") else base.model


def _residual_dtype(causal, default: torch.dtype) -> torch.dtype:
    """The hidden states' dtype between stages: the embedding's output, in the dtype of the unquantized base
    parameters, which every stage's norms share (16-bit under QLoRA without k-bit prep, fp32 under mixed precision)."""
    decoder = _decoder(causal)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    norm = getattr(layers[0], "input_layernorm", None) or getattr(layers[0], "ln_1", None) if layers else None
    weight = getattr(norm, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else default


def _gpt2_stage(transformer, inputs: torch.Tensor, *, first: bool) -> torch.Tensor:
    """A GPT-2 pipeline stage as Megatron-LM's GPTModel runs one: the token and position embeddings and their dropout
    on the first stage only (pre_process), the blocks, and ln_f on the last (post_process: ln_f is an Identity
    elsewhere). GPT2Model.forward's own steps, but for the position embeddings it would add on every stage and the
    final view to the whole sequence, which a stage holding 1/tp of the tokens (sequence parallel) is not."""
    import sys

    create_causal_mask = sys.modules[type(transformer).__module__].create_causal_mask
    tokens = inputs.shape[1] * (1 if first else getattr(transformer, "sequence_shards", 1))
    position_ids = torch.arange(tokens, device=inputs.device).unsqueeze(0)
    if first:
        inputs_embeds = transformer.wte(inputs)
        position_embeds = transformer.wpe(position_ids)
        hidden = transformer.drop(inputs_embeds + position_embeds)
    else:
        inputs_embeds = hidden = inputs
    mask = create_causal_mask(config=transformer.config, inputs_embeds=inputs_embeds, attention_mask=None,
                              past_key_values=None, position_ids=position_ids)
    for block in transformer.h:
        hidden = block(hidden, None, mask, None, encoder_attention_mask=None, use_cache=False,
                       position_ids=position_ids)
    return transformer.ln_f(hidden)


def _stage_spec(spec: ModelSpec, config: TrainingConfig, index: int) -> ModelSpec:
    """Stage `index`'s layers as a model of their own, for the MoE families and those alternating attention kinds:
    the per-layer lists of the config (gpt-oss's layer_types; Gemma-2's and Gemma 3's as their configs make them
    from the whole model's depth) cut to the stage's layers, and DeepSeek-V3's first_k_dense_replace to the stage's
    own leading dense layers (a decoder layer's kind follows its index in the module it is built in). torchtitan's
    split keeps each layer as it is in the whole model: the dense ones on the first stages."""
    if spec.family not in MOE_TENSOR_PARALLEL_FAMILIES and not attention_layer_types(spec):
        return spec
    split = pipeline_stage_layers(spec.num_layers, config.pp * config.virtual_stages)
    start, layers = sum(split[:index]), split[index]
    stage = pipeline_stages_model(config, spec, [index])
    model_config = {name: value[start:start + layers]
                    if isinstance(value, list) and len(value) == spec.num_layers and name != "architectures" else value
                    for name, value in spec.config.items()}
    if spec.dense_layers:
        model_config["first_k_dense_replace"] = stage.dense_layers
    if "layer_types" in stage.config:
        model_config["layer_types"] = stage.config["layer_types"]
    return stage.model_copy(update={"config": model_config, "num_layers": layers})


def _stage_module(spec: ModelSpec, config: TrainingConfig, *, layers: int, first: bool, last: bool, autocast):
    """The stage built on its own (its layers only), the embedding, norm and head removed where it has none."""
    from memtui.engine.torchside.build import build_model
    from memtui.engine.trace.generic import at_depth

    causal = build_model(at_depth(spec, layers), config, device="cpu", quant_backend="replica")
    decoder = _decoder(causal)
    if not first:  # the stage gets the hidden states (inputs_embeds) from the one before
        if spec.family == "gpt2":  # the token and position embeddings and their dropout: the first stage's
            decoder.wte = decoder.wpe = decoder.drop = None
        else:
            decoder.embed_tokens = None
    if not last:  # the final norm belongs to the last stage
        setattr(decoder, "ln_f" if spec.family == "gpt2" else "norm", torch.nn.Identity())
    return causal, _Stage(causal, first=first, last=last, autocast=autocast)


def _marked(tracker: MemoryTracker, method, phase: str, actions: list | None = None):
    """`method` marking `phase` as it starts; a receive (an action's start: its first argument the micro-batch)
    also noted in `actions` (memtui.engine.trace.schedule_compose)."""
    def run(*args, **kwargs):
        tracker.mark(phase)
        if actions is not None:
            actions.append((len(tracker.log.events), tracker.step, "F" if phase == "forward" else "B", args[0]))
        return method(*args, **kwargs)
    return run


def _unsharded_gradients(stage, tracker: MemoryTracker, gradients: set[int]):
    """PipelineStage runs each micro-batch's backward with FSDP2's gradient sync off: autograd accumulates every
    parameter's gradient whole, on FSDP2's unsharded parameter (not the sharded one the optimizer sees), until the
    schedule's last backward reduce-scatters them. Their allocations are gradients."""
    from torch.distributed.fsdp import FSDPModule

    original = stage.backward_one_chunk

    def backward_one_chunk(*args, **kwargs):
        result = original(*args, **kwargs)
        for module in stage.submod.modules():
            group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
            for fsdp_param in group.fsdp_params if group is not None else ():
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                alloc_id = tracker.alloc_id_of(unsharded.grad) if unsharded is not None and unsharded.grad is not None else None
                if alloc_id is not None:
                    gradients.add(alloc_id)
        return result

    return backward_one_chunk


@contextlib.contextmanager
def _fsdp_groups_in_their_layer(tracker: MemoryTracker, owners: dict[int, int]):
    """Layer tagging under FSDP2: what a layer's parameter group does is its layer's. The stage's last backward
    reduce-scatters each layer's gradients after the whole backward (PipelineStage calls every FSDP2 group's
    post_backward in turn), outside any layer's hooks: each group's events are its layer's, as they are when FSDP2
    runs post_backward inside the layer's own backward. A layer's backward starts with its group's pre_backward
    (the stage's last layer's runs before the hook layer_tagging marks it by), which prefetches the all-gather of
    the layer before it in the stage: that allocation is the prefetched layer's (the events stay the running
    layer's), so the stage's first layer allocates what a middle one does."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    originals = {"post_backward": FSDPParamGroup.post_backward, "unshard": FSDPParamGroup.unshard,
                 "pre_backward": FSDPParamGroup.pre_backward}

    def layer_of(group) -> int | None:
        layers = {owners.get(id(fsdp_param.sharded_param)) for fsdp_param in group.fsdp_params}
        return next(iter(layers)) if len(layers) == 1 and None not in layers else None

    def post_backward(group, *args, **kwargs):
        previous = tracker.layer
        layer = layer_of(group)
        if layer is not None:
            tracker.layer = layer
        try:
            return originals["post_backward"](group, *args, **kwargs)
        finally:
            tracker.layer = previous

    def unshard(group, *args, **kwargs):
        previous = tracker.owner
        tracker.owner = layer_of(group)
        try:
            return originals["unshard"](group, *args, **kwargs)
        finally:
            tracker.owner = previous

    def pre_backward(group, *args, **kwargs):
        layer = layer_of(group)
        if layer is not None:  # the layer's backward starts here (the stage's last layer's before its output's
            tracker.layer = layer  # gradient hook, which layer_tagging sets it by)
        return originals["pre_backward"](group, *args, **kwargs)

    wrapped = {"post_backward": post_backward, "unshard": unshard, "pre_backward": pre_backward}
    for name, method in wrapped.items():
        setattr(FSDPParamGroup, name, method)
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(FSDPParamGroup, name, method)


def _releasable_as_on_a_gpu(stage):
    """PipelineStage releases a stage's output once its send completes when the output is a plain torch.Tensor
    (`_output_slot_is_releasable`: backward then starts from its gradient edge); a FakeTensor is not one, so under
    FakeTensorMode every output would be kept until its backward. The trace answers as for the real tensor (kept
    under DDP, whose reducer needs the live outputs)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.nn.parallel import DistributedDataParallel

    original = stage._output_slot_is_releasable

    def releasable(output):
        if (type(output) is FakeTensor and not stage.is_last and stage.dw_builder is None
                and not isinstance(stage.submod, DistributedDataParallel)):
            return True, ""
        return original(output)

    return releasable


_WORLDS = itertools.count()  # the fake process groups this process has made, for their meshes' names


def _meshes(config: TrainingConfig):
    """(pp group, dp mesh, tp mesh) of torchtitan's DeviceMesh (pp, dp_shard, tp), or (pp, dp_replicate, dp_shard,
    tp) for HSDP (the dp mesh then its 2-D (replicate, shard) part), made outside FakeTensorMode as it must be;
    (None, None, None) for pipeline parallelism alone (the default group is the pipeline's)."""
    from torch.distributed.device_mesh import init_device_mesh

    if config.dp == 1 and config.tp == 1:
        return None, None, None
    # DTensor caches its sharding decisions by DeviceMesh, which compares by the ranks' layout and the dimensions'
    # names, not by the process groups: the next pipeline rank's (or the next trace's) meshes would equal this
    # one's, and a cached output spec carry this world's destroyed groups into the next. Named after this world,
    # equal meshes are of the same world.
    world = next(_WORLDS)
    hsdp = config.zero >= 2 and config.shard_ranks < config.dp
    data = (config.dp // config.shard_ranks, config.shard_ranks) if hsdp else (config.dp,)
    data_names = (f"dp_replicate{world}", f"dp_shard{world}") if hsdp else (f"dp{world}",)
    names = (f"pp{world}", *data_names, f"tp{world}")
    mesh = init_device_mesh("cpu", (config.pp, *data, config.tp), mesh_dim_names=names)
    return (mesh[names[0]].get_group(), mesh[data_names] if config.dp > 1 else None,
            mesh[names[-1]] if config.tp > 1 else None)


_WORLD_SUFFIX = re.compile(r"^(pp|dp|dp_replicate|dp_shard|tp)\d+$")


def _mesh_across_worlds(mesh) -> tuple:
    """What a DeviceMesh is to DTensor's sharding decisions, whatever world (pipeline rank) made it: its equality
    key (DeviceMesh.__eq__) with the world's number taken off the dimensions' names (_meshes)."""
    names = tuple(_WORLD_SUFFIX.sub(r"\1", name) for name in mesh.mesh_dim_names or ())
    return (mesh._flatten_rank_map, mesh._layout, mesh.device_type, names, mesh._thread_id,
            mesh._preserve_rank_order)


def _with_meshes(value, swap):
    """`value` (an OpSchema, an OutputSharding, DTensorSpecs in tuples, lists and dicts) with each DTensorSpec's
    mesh replaced by swap(mesh); the rest as it is."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor._op_schema import OpSchema, OutputSharding

    if isinstance(value, DTensorSpec):
        mesh = swap(value.mesh)
        if mesh is value.mesh:
            return value
        spec = copy.copy(value)
        spec.mesh = mesh  # DTensorSpec.__setattr__ drops the cached hash
        return spec
    if type(value) in (tuple, list):
        return type(value)(_with_meshes(item, swap) for item in value)
    if type(value) is dict:
        return {key: _with_meshes(item, swap) for key, item in value.items()}
    if isinstance(value, OpSchema):
        return OpSchema(value.op, _with_meshes(value.args_schema, swap), _with_meshes(value.kwargs_schema, swap),
                        schema_info=value.schema_info)
    if isinstance(value, OutputSharding):
        return OutputSharding(_with_meshes(value.output_spec, swap), _with_meshes(value.redistribute_schema, swap),
                              needs_redistribute=value.needs_redistribute,
                              use_val_from_redistribute_schema=value.use_val_from_redistribute_schema)
    return value


@contextlib.contextmanager
def _sharding_decisions_across_worlds():
    """DTensor caches its sharding decisions (ShardingPropagator.propagate_op_sharding_non_cached, behind its C++
    cache) by OpSchema, which holds the DeviceMeshes; each pipeline rank is traced in its own world, whose meshes
    are named apart (_meshes), so each rank would propagate every op's sharding anew (the foreach optimizer's most
    of all). A decision depends on the meshes' layout and dimensions, which every rank's share, not on which world
    made them: each is made once, on the first world's equal meshes, and handed to a later world on its own."""
    from torch.distributed.tensor import DTensor

    propagator = DTensor._op_dispatcher.sharding_propagator
    propagate_anew = propagator.propagate_op_sharding_non_cached
    first: dict[tuple, object] = {}  # _mesh_across_worlds key -> the first world's mesh
    decisions: dict = {}  # OpSchema on the first world's meshes -> its OutputSharding

    def propagate(op_schema):
        here: dict[int, object] = {}  # id(first world's mesh) -> this world's

        def to_first(mesh):
            known = first.setdefault(_mesh_across_worlds(mesh), mesh)
            here[id(known)] = mesh
            return known

        def back(mesh):
            if id(mesh) not in here:
                raise KeyError(mesh)
            return here[id(mesh)]

        schema = _with_meshes(op_schema, to_first)
        decision = decisions.get(schema)
        if decision is None:
            decision = decisions[schema] = propagate_anew(schema)
        if all(id(known) == id(mesh) for known, mesh in here.items()):
            return decision
        try:
            return _with_meshes(decision, back)
        except KeyError:  # a decision on a mesh none of the inputs is on: made on this world's own
            return propagate_anew(op_schema)

    propagator.propagate_op_sharding_non_cached = propagate
    try:
        yield
    finally:
        del propagator.propagate_op_sharding_non_cached


def _parallelize_stage(module, causal, config: TrainingConfig, layers: int, first: bool, last: bool, dp_mesh,
                       tp_mesh, restores: list, tracker: MemoryTracker, bucket_ids: set[int]):
    """The stage split as torchtitan's parallelize_llama splits a model part: the TP plan first (on its own
    modules), then FSDP2 per decoder layer and on the stage (its root group: the embedding on the first stage, the
    final norm and head on the last); with --zero 0 or 1, DistributedDataParallel on the stage over the
    data-parallel ranks (its buckets logged as it makes them). Returns the module the PipelineStage runs."""
    from memtui.engine.trace.parallel import ddp_wrap, fully_shard_layers
    from memtui.engine.trace.tensor_parallel import _meshes_made_real, apply_tensor_parallel, whole_sequence_masks

    if tp_mesh is not None:
        apply_tensor_parallel(causal, tp_mesh, embedding=first, head=last)
        restores.append(whole_sequence_masks(_decoder(causal), ranks=config.tp))
    if dp_mesh is not None and config.zero <= 1:
        if tp_mesh is not None:  # PyTorch's TP + DDP composition: DDP on the stage's local shards
            from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform

            _pre_dp_module_transform(module)
        with tracker:
            return ddp_wrap(module, tracker, config.dp, bucket_ids, process_group=dp_mesh.get_group())
    if dp_mesh is not None:
        offload = config.offload != "none"  # CPUOffloadPolicy on every group, as torchtitan's enable_cpu_offload
        with _meshes_made_real() if tp_mesh is not None else contextlib.nullcontext():
            module = fully_shard_layers(module, layers, dp_mesh, reshard=config.zero == 3, offload=offload)
        if offload:
            for parameter in module.parameters():
                tracker.mark_host(parameter)  # the shards, in host memory
    return module


def _trace_rank(spec: ModelSpec, config: TrainingConfig, rank: int, report, depth: int | None = None) -> RankTrace:
    """Pipeline rank `rank` (with data and tensor parallelism: the rank of dp and tp coordinate 0 in that pipeline
    position, of a fake process group of pp x dp x tp ranks): its stages, two schedule steps and optimizer steps.
    `depth`: the rank's one stage built with that many decoder layers, every event and allocation tagged with its
    layer (memtui.engine.trace.extend), for pipeline_extension."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from memtui.engine.torchside.build import build_optimizer, compute_dtype
    from memtui.engine.trace.cuda_autocast import cuda_autocast_policy, cuda_like_autocast
    from memtui.engine.trace.cuda_dropout import cuda_dropout
    from memtui.engine.trace.cuda_softmax import cuda_softmax
    from memtui.engine.trace.cuda_sdpa import cuda_sdpa
    from memtui.engine.trace.hf_patches import real_run_decisions

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; the trace needs its own")
    total = config.pp * config.virtual_stages
    split = pipeline_stage_layers(spec.num_layers, total)
    indices = pipeline_rank_stages(config)[rank]
    if depth is not None:
        if len(indices) != 1:
            raise ValueError("a rank of two stages is traced at its stages' depth")
        split = [depth if index == indices[0] else layers for index, layers in enumerate(split)]
    dtype = compute_dtype(config)
    hidden_dtype = torch.float32 if config.weight_bytes == 4 else dtype  # the residual stream: the weights' dtype
    logits_dtype = dtype if config.autocast or config.weight_bytes == 2 else torch.float32
    micro, seq = config.microbatch_size, config.seq_len
    local_seq = -(-seq // config.tp)  # sequence parallel: tp rank 0's share of the tokens between stages

    def autocast():
        return cuda_like_autocast(dtype) if config.autocast else contextlib.nullcontext()

    inner = config.dp * config.tp  # torchtitan's mesh: pp outermost, so pipeline rank r's first rank is r x dp x tp
    dist.init_process_group("fake", rank=rank * inner, world_size=config.pp * inner, store=FakeStore())
    extras = StepExtras()
    tracker = MemoryTracker()
    actions: list = []
    gradients: set[int] = set()
    stepped: set[int] = set()  # gradients as the optimizers find them (FSDP2's sharded ones, assigned outside autograd)
    gathered: set[int] = set()  # FSDP2's unsharded parameters
    buckets: set[int] = set()  # DDP's flat gradient buckets
    restores: list = []
    owners: dict[int, int] = {}  # layer tagging: id(parameter or buffer) -> its decoder layer
    grad_layers: dict[int, int | None] = {}
    tagging = contextlib.nullcontext()
    try:
        pp_group, dp_mesh, tp_mesh = _meshes(config)
        with quiet_libraries(), FakeTensorMode(allow_non_fake_inputs=True):
            causals, stages, weight_ids = [], [], set()
            for index in indices:
                first, last = index == 0, index == total - 1
                causal, module = _stage_module(_stage_spec(spec, config, index), config, layers=split[index],
                                               first=first, last=last, autocast=autocast)
                if last and config.loss == "standard":  # else the loss_fn marks it
                    causal.lm_head.register_forward_hook(lambda *_: tracker.mark("loss"))
                module = _parallelize_stage(module, causal, config, split[index], first, last, dp_mesh, tp_mesh,
                                            restores, tracker, buckets)
                if depth is not None:
                    from memtui.engine.trace.extend import layer_tagging, parameter_layers

                    layers = _decoder(causal).layers
                    owners = parameter_layers(layers)  # after the wrappers replaced the parameters
                    tagging = layer_tagging(tracker, layers)
                weight_ids |= watch_model(tracker, module, gradients, owners, grad_layers)
                residual_dtype = _residual_dtype(causal, hidden_dtype)  # what the stages send each other
                inputs = (torch.randint(0, spec.vocab_size, (micro, seq)) if first
                          else torch.empty(micro, local_seq, spec.hidden_size, dtype=residual_dtype, requires_grad=True))
                # The last stage's logits: their metadata is never sent (the loss is computed on the stage).
                outputs = torch.empty(micro, seq if last else local_seq,
                                      spec.vocab_size // config.tp if last else spec.hidden_size,
                                      dtype=logits_dtype if last else residual_dtype, requires_grad=True)
                if last and config.loss == "chunked":  # the head's output per sequence chunk
                    outputs = tuple(outputs.chunk(config.loss_chunks, dim=1))
                stage = PipelineStage(module, index, total, torch.device("cpu"), input_args=inputs,
                                      output_args=outputs, group=pp_group)
                stage._output_slot_is_releasable = _releasable_as_on_a_gpu(stage)
                # Phases for the tracker's categories: receives and compute of a forward, of a backward.
                if dp_mesh is not None and config.zero >= 2:
                    stage.backward_one_chunk = _unsharded_gradients(stage, tracker, stepped)
                for name, phase in (("get_fwd_recv_ops", "forward"), ("forward_one_chunk", "forward"),
                                    ("get_bwd_recv_ops", "backward"), ("backward_one_chunk", "backward")):
                    setattr(stage, name, _marked(tracker, getattr(stage, name), phase,
                                                 actions if name.endswith("recv_ops") else None))
                causals.append(causal)
                stages.append(stage)
                del inputs, outputs
            extras.params = sum(p.numel() for stage in stages for p in stage.submod.parameters())
            extras.trainable_params = sum(p.numel() for stage in stages for p in stage.submod.parameters()
                                          if p.requires_grad)
            # torchtitan keeps one optimizer per model part and steps them in turn.
            optimizers = [build_optimizer(stage.submod, config, device_type="cuda") for stage in stages]
            if dp_mesh is not None and config.zero == 1:
                from memtui.engine.torchside.sharding import zero_redundancy

                # ZeRO-1: each stage's optimizer sharded over the data-parallel ranks of its pipeline position
                optimizers = [zero_redundancy(optimizer, dp_mesh.get_group()) for optimizer in optimizers]
            for stage, optimizer in zip(stages, optimizers):
                record_stepped_gradients(stage.submod, optimizer, tracker, stepped)
            if config.offload != "none":
                optimizers = [steps_on_the_host(optimizer, tracker) for optimizer in optimizers]
            for optimizer in optimizers:
                for state in optimizer_state_tensors(optimizer)[0]:
                    tracker.track(state, "optimizer_state")
                tag_optimizer_states(tracker, optimizer, owners)
            scaler = _grad_scaler(config, tracker)
            loss_fn = _stage_loss(config, spec, causals[-1], tracker, autocast, scaler)
            schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}.get(config.pp_schedule)
            schedule = (schedule_class(stages[0], config.microbatches, loss_fn=loss_fn) if schedule_class
                        else ScheduleInterleaved1F1B(stages, config.microbatches, loss_fn=loss_fn))
            has_first, has_last = any(s.is_first for s in stages), any(s.is_last for s in stages)

            tracker.mark("inputs")
            attention = cuda_sdpa() if config.attention == "flash" else contextlib.nullcontext()
            policy = cuda_autocast_policy() if config.autocast else contextlib.nullcontext()
            parallel = contextlib.ExitStack()
            if tp_mesh is not None:
                from torch.distributed.tensor.parallel import loss_parallel

                from memtui.engine.trace.tensor_parallel import _WaitReturnsItsInput

                parallel.enter_context(loss_parallel())
                parallel.enter_context(_WaitReturnsItsInput())
            if dp_mesh is not None and config.zero >= 2:
                parallel.enter_context(fsdp_storage_resizes(tracker, gathered))
                if config.offload != "none":
                    parallel.enter_context(cpu_offload_copies(tracker))
                if depth is not None:
                    parallel.enter_context(_fsdp_groups_in_their_layer(tracker, owners))
            with attention, policy, cuda_dropout(), cuda_softmax(), real_run_decisions(), parallel, tagging, tracker:
                ids = torch.randint(0, spec.vocab_size, (config.batch_size, seq)) if has_first else None
                labels = (ids if ids is not None else torch.randint(0, spec.vocab_size, (config.batch_size, seq))
                          ) if has_last else None
                for step in range(1, STEPS + 1):
                    tracker.step = step
                    report(f"rank {rank}: step {step} of {STEPS}", (rank + (step - 1) / STEPS) / config.pp)
                    for _accumulated in range(traced_micro_batches(config)):  # torchtitan: a step() per one
                        losses: list | None = [] if has_last else None
                        schedule.step(*((ids,) if has_first else ()), target=labels, losses=losses,
                                      return_outputs=False)
                        del losses
                    tracker.mark("optimizer")
                    for optimizer in optimizers:
                        if scaler is not None:
                            scaler.step(optimizer)
                        else:
                            optimizer.step()
                    if scaler is not None:
                        scaler.update()
                    for optimizer in optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    tracker.mark("end")
            device_states, host_states = [], []
            for optimizer in optimizers:
                device, host = optimizer_state_tensors(optimizer)
                device_states += device
                host_states += host
            if scaler is not None:  # its scale and growth tracker live on the device (classify_by_owner's)
                device_states += [scaler._scale, scaler._growth_tracker]
            classify(tracker.log, weights=weight_ids, gradients=gradients,
                     optimizer={tracker.alloc_id_of(t) for t in device_states} - {None},
                     host={tracker.alloc_id_of(t) for t in host_states} - {None})
            # Categories by owner for what FSDP2 allocates (classify() sees only the phase it was made in).
            for alloc_id in gathered:
                tracker.log.allocations[alloc_id].category = "weights"
            for alloc_id in stepped:
                tracker.log.allocations[alloc_id].category = "gradients"
            for alloc_id in buckets:  # the estimator's DDP term is a temporary of every moment
                tracker.log.allocations[alloc_id].category = "temporary"
            if depth is not None:
                from memtui.engine.trace.extend import tag_owned

                tag_owned(tracker.log, grad_layers)
                for optimizer in optimizers:
                    tag_optimizer_states(tracker, optimizer, owners)
            tracker.detach_finalizers()
            del ids, labels, schedule, stages, causals, optimizers
    finally:
        for restore in restores:
            restore()
        dist.destroy_process_group()
    return RankTrace(rank=rank, stages=indices, layers=sum(split[index] for index in indices),
                     embedding=0 in indices, head=total - 1 in indices, log=tracker.log, extras=extras,
                     actions=actions)


def trace_pipeline(spec: ModelSpec, config: TrainingConfig, report=None, *, reuse: bool = True, finish=None) -> list:
    """Every pipeline rank's two steps, one rank after the other. A rank whose step is another's (_rank_role) takes
    that rank's trace, and a rank whose stage is deep enough is traced at a few layers and extended to its own
    (_StageExtension) once that has been checked on a rank of each kind of stage (`reuse=False`: every rank traced
    at every layer). The traces this asks for are independent programs (each rank in its own fake world), made two
    at a time where this process can fork (_traced_in_two).

    `finish`: a function of a rank's trace (the runner's: its budget), which depends on the trace's log and extras
    only. Given, the result is [(the rank's trace without its log, finish(its trace))], the ranks' logs laid out,
    extended and finished two at a time as the traces are (_finished_in_two); ranks that share a trace share its
    result."""
    report = report or (lambda _stage, _fraction: None)
    extension = _StageExtension(spec, config, report) if reuse and extension_refusal(spec, config) is None else None
    entries: list = []  # per rank: a RankTrace, a function making it (_StageExtension.later), or the rank it copies
    traced: dict[tuple, int] = {}  # role -> the rank whose entry it is
    with _sharding_decisions_across_worlds() if config.tp > 1 or config.dp > 1 else contextlib.nullcontext():
        made = _traced_in_two(spec, config, report, _planned_traces(spec, config, extension, reuse))

        def trace_rank(rank: int, depth: int | None = None) -> RankTrace:
            known = made.pop((rank, depth), None)
            return known if known is not None else _trace_rank(spec, config, rank, report, depth=depth)

        if extension is not None:
            extension.trace_rank = trace_rank
        for rank in range(config.pp):
            role = _rank_role(spec, config, rank) if reuse else None
            if role in traced:
                entries.append(traced[role])
                continue
            if extension is None:
                entry = None
            elif finish is None:
                entry = extension.trace(rank)
            else:
                entry = extension.later(rank)
            if entry is None:
                entry = trace_rank(rank)
            if role is not None:
                traced[role] = rank
            entries.append(entry)

        def fallback(rank: int) -> RankTrace:  # a deferred extension that failed, as _StageExtension.trace does it
            return extension.trace(rank) or trace_rank(rank)

        def copied(trace: RankTrace, rank: int) -> RankTrace:
            return dataclasses.replace(trace, rank=rank, stages=pipeline_rank_stages(config)[rank])

        if finish is None:
            traces: list[RankTrace] = []
            for rank, entry in enumerate(entries):
                traces.append(copied(traces[entry], rank) if isinstance(entry, int) else entry)
            return traces
        own = [rank for rank, entry in enumerate(entries) if not isinstance(entry, int)]
        finished = _finished_in_two(own, entries, finish, fallback)
    results: list = []
    for rank, entry in enumerate(entries):
        trace, result = finished[entry if isinstance(entry, int) else rank]
        results.append((copied(trace, rank), copy.copy(result) if isinstance(entry, int) else result))
    return results


@contextlib.contextmanager
def _collector_off():
    """Python's cyclic garbage collector off: the logs made and read here are millions of small objects in no
    cycle, and each full collection would walk all of them again (and, in a forked process, write to every page
    holding one, copying it). Never around a trace, whose frees may wait for the collector as they do anywhere."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _in_two_processes(theirs, mine) -> tuple:
    """(mine(), theirs()) with `theirs` run in a forked process beside `mine` here: its dict comes back pickled
    ({} where the child fails: the caller does that part itself, and meets the error there); the child then goes
    without the parent's exit handlers. The caller has checked that this process can fork safely."""
    import os
    import pickle

    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            results = theirs()
            with _collector_off():
                data = pickle.dumps(results)
        except BaseException:
            data = pickle.dumps({})
        with os.fdopen(write, "wb") as pipe:
            pipe.write(data)
        os._exit(0)
    os.close(write)
    try:
        result = mine()
    finally:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        os.waitpid(child, 0)
    with _collector_off():
        return result, pickle.loads(data) if data else {}


def _finished_in_two(ranks: list[int], entries: list, finish, fallback) -> dict[int, tuple]:
    """{rank: (its trace without its log, finish(its trace))} for `ranks`, each entry a RankTrace or a function
    making it (raising NotExtensible or NotComposable where `fallback(rank)` makes it instead), half of them in a
    forked process, which sends back the small results rather than the logs; in turn where this process cannot fork
    safely or the child fails."""
    import os
    import threading

    from memtui.engine.trace.extend import NotExtensible
    from memtui.engine.trace.schedule_compose import NotComposable

    def made(rank: int) -> RankTrace | None:
        entry = entries[rank]
        if isinstance(entry, RankTrace):
            return entry
        try:
            with _collector_off():
                return entry()
        except (NotExtensible, NotComposable):
            return None

    def done(trace: RankTrace | None, rank: int) -> tuple:
        if trace is None:  # traced here, the collector on as for every trace
            trace = fallback(rank)
        with _collector_off():
            return dataclasses.replace(trace, log=MemoryLog(), actions=[]), finish(trace)

    finished: dict[int, tuple] = {}
    if len(ranks) > 1 and hasattr(os, "fork") and threading.active_count() == 1:
        # the child's ranks: their results, or None for one the parent makes itself
        finished, theirs = _in_two_processes(
            lambda: {rank: done(trace, rank) if (trace := made(rank)) is not None else None for rank in ranks[1::2]},
            lambda: {rank: done(made(rank), rank) for rank in ranks[0::2]})
        finished.update((rank, result) for rank, result in theirs.items() if result is not None)
    for rank in ranks:
        if rank not in finished:
            finished[rank] = done(made(rank), rank)
    return finished


def _planned_traces(spec: ModelSpec, config: TrainingConfig, extension, reuse: bool) -> list[tuple[int, int | None]]:
    """The (rank, depth) traces trace_pipeline will ask for if every kind of stage passes its check (depth None:
    every layer); one that fails asks for more, traced then."""
    planned: list[tuple[int, int | None]] = []
    roles: set[tuple] = set()
    kinds: set[tuple[bool, bool]] = set()
    for rank in range(config.pp):
        role = _rank_role(spec, config, rank) if reuse else None
        if role is not None and role in roles:
            continue
        roles.add(role)
        if extension is None or extension.split[rank] <= extension._shape(rank)[0] + 1:
            planned.append((rank, None))
            continue
        depth, _template, kind = extension._shape(rank)
        if rank not in extension.composed:
            planned.append((rank, depth))
        if kind not in kinds:
            kinds.add(kind)
            planned.append((extension.representative(rank), depth + 1))
    return sorted(set(planned), key=planned.index)


def _traced_in_two(spec: ModelSpec, config: TrainingConfig, report, planned: list) -> dict:
    """The planned traces, {(rank, depth): RankTrace}, made by this process and a forked one side by side (half
    the time on two cores: each trace is its own program in its own fake world, as traced in turn); {} where this
    process cannot fork safely (another thread running, no os.fork) or the child fails (each is then traced in
    turn, as it is asked for)."""
    import os
    import threading

    if len(planned) < 2 or not hasattr(os, "fork") or threading.active_count() > 1:
        return {}
    split = pipeline_stage_layers(spec.num_layers, config.pp * config.virtual_stages)

    def cost(job) -> int:  # decoder layers run, the embedding and the head as one more each
        rank, depth = job
        return (split[rank] if depth is None else depth) + (rank == 0) + (rank == config.pp - 1)

    mine: list = []
    theirs: list = []
    for job in sorted(planned, key=cost, reverse=True):  # longest first, each to the less loaded side
        (mine if sum(map(cost, mine)) <= sum(map(cost, theirs)) else theirs).append(job)
    made, theirs_made = _in_two_processes(
        lambda: {job: _trace_rank(spec, config, job[0], lambda *_: None, depth=job[1]) for job in sorted(theirs)},
        lambda: {job: _trace_rank(spec, config, job[0], report, depth=job[1]) for job in sorted(mine)})
    made.update(theirs_made)
    return made


def extension_refusal(spec: ModelSpec, config: TrainingConfig) -> str | None:
    """Why a pipeline's stages are traced at every layer, or None where a stage can be traced at a few layers and
    extended (memtui.engine.trace.extend), subject to the check."""
    from memtui.engine.trace.extend import layers_refusal

    if config.virtual_stages > 1:
        return "a rank of two stages (interleaved 1F1B) is traced at every layer"
    if config.dp > 1 and config.zero <= 1:
        return "DDP's gradient buckets fill by bytes, not layer by layer: traced at every layer"
    return layers_refusal(spec, config)


class _StageExtension:
    """A rank's stage traced at a few decoder layers and its log extended to the stage's layers (extend_log,
    repeating a layer whose neighbours are alike). The model's first and last layers may differ from the rest, as
    on one GPU, and the template's neighbours are kept off them: a middle stage is traced at 3 layers (template 1),
    the first or the last at 4. Under FSDP2 the stage's own outer layers differ too (the last is not resharded
    after forward), but only in allocations of their own: the layer tagging gives each layer its own all-gathers
    (_fsdp_groups_in_their_layer) and the extension matches a neighbour's allocations by their signature
    (memtui.engine.trace.extend). Before any rank of a kind (first, middle, last stage) is extended, one rank of that
    kind is traced at one layer more and that log must be the one rebuilt by the extension, event by event; else
    every rank of the kind is traced at every layer. Under 1F1B a middle rank's log at its few layers is composed
    from the source rank's (_composition) once the check rank's composed log was its traced one."""

    def __init__(self, spec: ModelSpec, config: TrainingConfig, report) -> None:
        self.spec, self.config, self.report = spec, config, report
        self.split = pipeline_stage_layers(spec.num_layers, config.pp)
        self.checked: dict[tuple[bool, bool], StepExtras | None] = {}  # kind -> a layer's parameters, if it passed
        # (rank, depth) -> the rank's trace at that depth (trace_pipeline's: made beforehand where it can)
        self.trace_rank = lambda rank, depth: _trace_rank(spec, config, rank, report, depth=depth)
        self.lows: dict[int, RankTrace] = {}  # rank -> its trace at its few layers, once made
        self.source, self.check, self.composed = self._composition()
        self.composable: bool | None = None  # whether the check rank's composed log was its traced one
        self.laid_out: set[int] = set()  # the ranks whose log at a few layers was composed

    def _shape(self, rank: int) -> tuple[int, int, tuple[bool, bool]]:
        kind = (rank == 0, rank == self.config.pp - 1)
        return 3 + kind[0] + kind[1], 1 + kind[0], kind  # (layers traced, template, kind)

    def _composition(self) -> tuple[int | None, int | None, set[int]]:
        """Under 1F1B (one schedule step per optimizer step), the middle ranks whose log at a few layers is built
        from another's (memtui.engine.trace.schedule_compose): (the rank traced for them, whose actions are in
        the most places; the rank traced to check the composition, the one farthest from it; the ranks composed)."""
        from memtui.engine.trace.schedule_compose import one_f_one_b_order, places

        config = self.config
        middle = [rank for rank in range(1, config.pp - 1) if self.split[rank] > self._shape(rank)[0] + 1]
        if config.pp_schedule != "1f1b" or traced_micro_batches(config) != 1 or len(middle) < 3:
            return None, None, set()
        held = {rank: set(places(one_f_one_b_order(config.microbatches, config.pp, rank), config.microbatches))
                for rank in middle}
        centre = (config.pp - 1) / 2
        source = max(middle, key=lambda rank: (len(held[rank]), -abs(rank - centre), rank))
        covered = [rank for rank in middle if rank != source and held[rank] <= held[source]]
        if len(covered) < 2:
            return None, None, set()
        check = max(covered, key=lambda rank: (abs(rank - source), rank))
        return source, check, set(covered) - {check}

    def representative(self, rank: int) -> int:
        """The rank whose traces check the extension for `rank`'s kind of stage: the composition's source for the
        middle stages it serves (it must be traced at one layer more anyway), else `rank`."""
        return self.source if rank in self.composed or rank == self.check else rank

    def _composition_holds(self, depth: int) -> bool:
        """Whether the check rank's composed log at `depth` layers was its traced one (found out once)."""
        from memtui.engine.trace.extend import same_log
        from memtui.engine.trace.schedule_compose import NotComposable

        if self.composable is None:
            source, check = self._low(self.source, depth), self._low(self.check, depth)
            try:
                with _collector_off():
                    self.composable = same_log(self._composed_log(source, self.check), check.log)
            except NotComposable:
                self.composable = False
        return self.composable

    def _composed_low(self, rank: int, depth: int) -> RankTrace:
        """Rank `rank`'s trace at `depth` layers laid out from the source rank's (raises NotComposable)."""
        source = self._low(self.source, depth)
        return dataclasses.replace(source, rank=rank, stages=[rank], actions=[], log=self._composed_log(source, rank))

    def _low(self, rank: int, depth: int) -> RankTrace:
        """Rank `rank`'s trace at `depth` layers: composed from the source rank's once the check rank's composed
        log was its traced one, else traced."""
        from memtui.engine.trace.schedule_compose import NotComposable

        if rank in self.lows:
            return self.lows[rank]
        trace = None
        if rank in self.composed and self._composition_holds(depth):
            with contextlib.suppress(NotComposable):
                trace = self._composed_low(rank, depth)
                self.laid_out.add(rank)
        if trace is None:
            trace = self.trace_rank(rank, depth)
        self.lows[rank] = trace
        return trace

    def _composed_log(self, source: RankTrace, rank: int) -> MemoryLog:
        from memtui.engine.trace.schedule_compose import compose_log, one_f_one_b_order

        config = self.config
        return compose_log(source.log, source.actions,
                           one_f_one_b_order(config.microbatches, config.pp, source.rank),
                           one_f_one_b_order(config.microbatches, config.pp, rank), config.microbatches)

    def trace(self, rank: int) -> RankTrace | None:
        """Rank `rank`'s trace extended from a few layers, or None where it is traced at every layer."""
        from memtui.engine.trace.extend import NotExtensible

        made = self.later(rank, defer=False)
        try:
            return made() if made is not None else None
        except NotExtensible:
            return None

    def later(self, rank: int, *, defer: bool = True):
        """What `trace` does for `rank`, its kind's check made now and the work on its own log (its layout from the
        source rank's, its extension) left to the function returned, which returns the extended trace or raises
        NotExtensible (the rank is then traced at every layer) or, `defer`ring the layout, NotComposable (`trace`
        then traces its few layers); None where the rank is traced at every layer. The function needs only the
        traces made so far, so it can run in another process (trace_pipeline's `finish`)."""
        from memtui.engine.trace.extend import NotExtensible, extend_log, same_log

        depth, template, kind = self._shape(rank)
        layers = self.split[rank]
        if layers <= depth + 1:
            return None
        if kind not in self.checked:
            self.checked[kind] = None
            checked = self.representative(rank)
            low = self._low(checked, depth)
            high = self.trace_rank(checked, depth + 1)
            try:
                with _collector_off():
                    same = same_log(extend_log(low.log, depth, depth + 1, template), high.log)
                if same:
                    per_layer = StepExtras(params=high.extras.params - low.extras.params,
                                           trainable_params=high.extras.trainable_params
                                           - low.extras.trainable_params)
                    self.checked[kind] = per_layer
            except NotExtensible:
                pass
        per_layer = self.checked[kind]
        if per_layer is None:
            return None
        laid_out = defer and rank in self.composed and rank not in self.lows and self._composition_holds(depth)
        # the traces it needs made here and now, before the function is called elsewhere
        traced = self._low(self.source if laid_out else rank, depth)

        def extended() -> RankTrace:
            low = self._composed_low(rank, depth) if laid_out else traced
            log = extend_log(low.log, depth, layers, template)
            added = layers - depth
            extras = dataclasses.replace(low.extras, params=low.extras.params + added * per_layer.params,
                                         trainable_params=low.extras.trainable_params
                                         + added * per_layer.trainable_params)
            note = ("decoder layers: a stage traced at 3 layers (the first and the last at 4) and its log extended to "
                    "the stage's layers (memtui.engine.trace.extend), each kind of stage (first, middle, last) once "
                    "its step one layer deeper was rebuilt event by event, exactly")
            if laid_out or rank in self.laid_out:
                note = ("decoder layers: most middle ranks' logs at 3 layers laid out from one middle rank's actions "
                        "in their own order (memtui.engine.trace.schedule_compose), once another rank's laid-out log "
                        "was its traced one event by event, and extended as the others")
            return dataclasses.replace(low, layers=layers, log=log, extras=extras, actions=[], note=note)

        return extended


def _rank_role(spec: ModelSpec, config: TrainingConfig, rank: int) -> tuple | None:
    """What a rank's step depends on, where two ranks that agree on it allocate alike: ScheduleGPipe runs every
    rank the same way (each micro-batch's forward, its receive before and send after, then each backward likewise),
    so a rank's allocations follow from its stage's layers and whether it holds the embedding or the head (the
    first stage receives nothing, the last sends nothing and computes the loss); the fake process group and
    DeviceMesh give every rank the same shapes. None where the schedule differs by rank (1F1B's warm-up is pp - 1 -
    rank forwards; interleaved runs two stages per rank)."""
    if config.pp_schedule != "gpipe":
        return None
    total = config.pp * config.virtual_stages
    split = pipeline_stage_layers(spec.num_layers, total)
    indices = pipeline_rank_stages(config)[rank]
    return tuple((split[index], index == 0, index == total - 1) for index in indices)


def pipeline_lines(config: TrainingConfig, spec: ModelSpec) -> list[str]:
    """What the trace ran, for `traced`."""
    schedule = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                "interleaved-1f1b": "ScheduleInterleaved1F1B (two stages per rank: r and r + pp)"}[config.pp_schedule]
    split = pipeline_stage_layers(spec.num_layers, config.pp * config.virtual_stages)
    embedding = ("the token and position embeddings and their dropout (Megatron-LM's pre_process)"
                 if spec.family == "gpt2" else "the embedding")
    lines = [f"pipeline parallel (traced): torch.distributed.pipelining PipelineStage and {schedule} at pp "
             f"{config.pp}, every rank of a fake process group in turn; {config.microbatches} micro-batches of "
             f"{config.microbatch_size} sequences; decoder layers per stage {split}, {embedding} on the first "
             "stage, the final norm, head and loss (per micro-batch) on the last"]
    if spec.dense_layers:
        lines.append(f"DeepSeek-V3's {spec.dense_layers} leading dense layers on the first stages: each stage built "
                     "with its own layers' kinds, as torchtitan's split keeps every layer")
    lines += _option_lines(config)
    if config.dp > 1 or config.tp > 1:
        lines.append(f"each pipeline rank traced as the first rank of its (dp {config.dp}, tp {config.tp}) slice of a "
                     f"(pp, dp, tp) DeviceMesh of {config.gpus} ranks, as torchtitan builds it, the stage parallelized "
                     "as torchtitan's parallelize_llama does a model part")
    if config.tp > 1:
        plan = "Megatron-LM's GPT-2 plan" if spec.family == "gpt2" else "torchtitan's Llama plan"
        lines.append(f"tensor parallel (traced): DTensor at tp {config.tp}, {plan} on each stage's "
                     "modules (sequence parallel: the hidden states between stages are the rank's 1/tp of the tokens; "
                     "the vocabulary-sharded embedding on the first stage, the head with loss parallel on the last)")
        if spec.family in MOE_TENSOR_PARALLEL_FAMILIES:
            from memtui.engine.trace.moe_parallel import moe_plan_lines

            deepseek = spec.family == "deepseek_v3"
            lines += moe_plan_lines(routed=True, shared=deepseek and bool(spec.config.get("n_shared_experts")),
                                    latent=deepseek)
    if config.dp > 1 and config.zero <= 1:
        if config.tp > 1:
            lines.append("DDP beside tp as PyTorch composes them: torch.distributed.tensor.parallel.ddp."
                         "_pre_dp_module_transform makes each stage's DTensor parameters local for DDP, which buckets "
                         "and all-reduces this rank's shards (Megatron-LM's TP + DP layout; torchtitan refuses DDP "
                         "beside TP)")
        lines.append(f"DDP on each stage over dp {config.dp}: 25 MiB gradient buckets (1 MiB first), "
                     "gradient_as_bucket_view=False, rebuilt after step 1; PipelineStage runs every forward and all "
                     "but the stage's last backward under no_sync, and keeps each sent output until its backward "
                     "(DDP's reducer needs the live outputs)")
        if config.zero == 1:
            lines.append("ZeRO-1: torch's ZeroRedundancyOptimizer on each stage's optimizer over the data-parallel "
                         "ranks, this rank's share of the optimizer states")
    elif config.dp > 1:
        where = f"dp {config.dp}"
        if config.shard_ranks < config.dp:
            where += (f" as HSDP ({config.dp // config.shard_ranks} replicas x {config.shard_ranks} shards: sharded "
                      "within the shard group, gradients all-reduced across the replicas)")
        lines.append(f"FSDP2 fully_shard per decoder layer and on each stage over {where}, "
                     f"reshard_after_forward={config.zero == 3}; PipelineStage accumulates each micro-batch's "
                     "gradients unsharded (gradient sync off) and reduce-scatters them after the stage's last backward")
        if config.offload != "none":
            lines.append(f"{CPU_OFFLOAD}, on every stage's groups (torchtitan's enable_cpu_offload on each model part)")
            lines += cpu_offload_lines(config)
    return lines


def _option_lines(config: TrainingConfig) -> list[str]:
    """What the trace ran of the loss, accumulation and loss-scaling options, for `traced`."""
    lines = []
    if config.loss == "chunked":
        lines.append(f"torchtune's chunked loss on the last stage: its forward returns the head's output per sequence "
                     f"chunk ({config.loss_chunks}), which PipelineStage keeps until the micro-batch's backward; the "
                     "schedule's loss_fn is CEWithChunkedOutputLoss on them")
    elif config.loss == "fused-linear":
        lines.append("fused linear cross-entropy on the last stage: its forward returns the final norm's output "
                     "(kept until the micro-batch's backward); the schedule's loss_fn is Liger's fused linear "
                     "cross-entropy (its chunked forward in plain torch off CUDA) on it and the head's weight")
    if config.grad_accum > 1:
        shown = traced_micro_batches(config)
        rest = f" (the other {config.grad_accum - shown} are the same as the last)" if shown < config.grad_accum else ""
        lines.append(f"gradient accumulation as torchtitan's loop runs it: {shown} of {config.grad_accum} "
                     f"schedule.step() calls per optimizer step{rest}, the loss divided by their count")
    if config.precision == "16-mixed":
        lines.append("fp16 loss scaling: a GradScaler on every rank; the last stage's loss_fn scales each loss, "
                     "every rank unscales its stages' gradients and steps its optimizers through it")
    return lines
