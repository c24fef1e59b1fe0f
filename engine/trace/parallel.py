"""Data parallelism traced for one rank at the real world size, on fake tensors.

torch's `fake` process-group backend lets this process be rank 0 of a job of
`dp` ranks: every collective is a no-op that returns at once, and the tensors
the collectives write into are allocated by the wrappers exactly as on a GPU
(DDP's gradient buckets, FSDP2's all-gather and reduce-scatter buffers), so
the MemoryTracker sees them. The model is wrapped as memtui's live runs wrap
it (memtui.engine.live.distributed):

- ZeRO-0: DistributedDataParallel with its defaults (25 MiB buckets, a 1 MiB
  first bucket, gradient_as_bucket_view=False);
- ZeRO-1: the same DDP, the optimizer wrapped in ZeroRedundancyOptimizer (rank
  0 keeps the states of the whole tensors dealt to it, largest first);
- ZeRO-2 / ZeRO-3: FSDP2 `fully_shard` per decoder layer and at the root,
  reshard_after_forward False / True; with `--shard-group G` (HSDP) on a 2-D
  DeviceMesh (dp/G replicas x G shards) as torchtitan builds it: sharded within
  G ranks, the gradients' shards all-reduced across the replicas in place (the
  reduce-scatter output they live in is the all-reduce's buffer).

QLoRA's 4-bit layers (memtui's bitsandbytes replicas) ride along: DDP buckets only the adapters' gradients, and
FSDP2 shards the packed weights as bitsandbytes' FSDP support does (QLORA_FSDP2). Refused, and then modelled on a
single-GPU trace (data_parallel_refusal): DeepSpeed's ZeRO-3 offload and LLM.int8 under FSDP2. DeepSpeed's
ZeRO-Offload with ZeRO-1 or 2 (`--offload optimizer`, one GPU too) runs memtui's stand-in of DeepSpeedZeroOptimizer
(memtui.engine.trace.zero_offload).
`--zero 3 --offload optimizer+params` is FSDP2's CPUOffloadPolicy (CPU_OFFLOAD): the shards and the optimizer on
the host, the host-device copies the CPU device skips made as on a GPU (cpu_offload_copies).

Two things the fake backend cannot do are worked around, allocating as the
real program does: its all-reduce returns no tensor (a comm hook reduces the
bucket in place, as NCCL does), and DDP's bucket rebuild reads the bucket
indices it broadcasts (those few integers are made real; the buckets stay fake).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from memtui.engine.estimator.layout import cpu_offload_refusal, zero_offload_refusal
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.trace.tracker import MemoryLog, MemoryTracker


def data_parallel_refusal(config: TrainingConfig) -> str | None:
    """Why the trace cannot run this configuration's real data-parallel program (it is then modelled), or None.
    Tensor and pipeline parallelism have traces of their own (memtui.engine.trace.tensor_parallel, .pipeline)."""
    if config.tp > 1 or config.pp > 1 or (config.dp == 1 and not config.deepspeed_offload):
        return "no data parallelism alone"
    if config.deepspeed_offload:  # one GPU too: DeepSpeed runs its ZeRO stages (and offload) on a world of one
        return zero_offload_refusal(config)
    if config.offload != "none" and cpu_offload_refusal(config) is not None:
        return cpu_offload_refusal(config)
    return None  # LLM.int8 under FSDP2 is refused before this (memtui.engine.model.validation)


def traces_data_parallel(config: TrainingConfig) -> bool:
    """Whether the trace can run this configuration's real data-parallel program (else it is modelled)."""
    return data_parallel_refusal(config) is None


def _decoder_layers(model: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The ModuleList of `count` decoder blocks (through peft's wrappers)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return []


# What `--zero 2|3 --quant nf4` runs: bitsandbytes' own FSDP support (HF accelerate + peft, Answer.AI's fsdp_qlora),
# not torchtune's torchao NF4Tensor (which shards the scalers too). Params4bit's torch.chunk keeps its QuantState,
# Linear4bit restores it from the module after the all-gather (fix_4bit_weight_quant_state_from_module), and FSDP2
# all-gathers a group of mixed dtypes as bytes.
QLORA_FSDP2 = ("QLoRA under FSDP2 as bitsandbytes shards it (HF accelerate + peft, Answer.AI's fsdp_qlora; not "
               "torchtune's torchao NF4Tensor): the packed 4-bit weights sharded and all-gathered with the layer's "
               "adapters and norms (one byte-wise buffer for the mixed dtypes), their quantization statistics "
               "(absmax, nested absmax, code) whole on every rank, as the layer's QuantState")


# --zero 3 --offload optimizer+params as PyTorch runs it (torchtune's fsdp_cpu_offload, torchtitan's cpu_offload).
CPU_OFFLOAD = ("FSDP2 CPUOffloadPolicy (unpinned: fake tensors cannot be pinned, the device allocates the same): "
               "the shards in host memory, each copied to the device "
               "before its group's all-gather, the reduced gradients copied to the host (the reduce-scatter output "
               "freed), the optimizer stepping on the CPU (none of it in the device's peak)")


def cpu_offload_lines(config: TrainingConfig) -> list[str]:
    """What the trace ran of gradient accumulation and fp16 loss scaling under CPUOffloadPolicy, for `traced`."""
    lines = []
    if config.grad_accum > 1:
        lines.append("gradient accumulation under CPUOffloadPolicy: gradient sync left on (torchtitan's loop), so every "
                     "reduce-scatter's shards (each micro-batch's; on pipeline stages each schedule step's) are copied "
                     "to the host and added there into the host gradients (foreach_reduce): the device keeps none")
    if config.precision == "16-mixed":
        lines.append("fp16 loss scaling under CPUOffloadPolicy: the GradScaler's scale on the device, unscale_ in place "
                     "on the host gradients (the inverse scale and the inf flag copied to the CPU)")
    return lines


class DataParallel:
    """The hooks run_fake_steps calls to run one rank of a data-parallel job; says what it traced."""

    def __init__(self, config: TrainingConfig, num_layers: int, mesh) -> None:
        self.config = config
        self.num_layers = num_layers
        self.mesh = mesh
        self.tracker: MemoryTracker | None = None
        self.model: torch.nn.Module | None = None  # the FSDP2 root, whose streams are named in the log
        self.bucket_ids: set[int] = set()  # DDP's flat gradient buckets
        self.gathered_ids: set[int] = set()  # FSDP2's unsharded parameters
        self.gradient_ids: set[int] = set()  # gradients as the optimizer finds them (FSDP2's sharded ones)
        dp = config.dp
        self.zero_offload = None  # DeepSpeed's ZeRO-Offload stand-in (memtui.engine.trace.zero_offload)
        if config.deepspeed_offload:
            from memtui.engine.trace.zero_offload import DEEPSPEED_OFFLOAD, REDUCE_BUCKET_SIZE

            self.traced = [DEEPSPEED_OFFLOAD.format(stage=config.zero, bucket=REDUCE_BUCKET_SIZE, dp=dp)]
            self.modelled = []
        elif config.zero <= 1:
            self.traced = [f"DDP at world size {dp} (rank 0 of a fake process group): 25 MiB gradient buckets "
                           "(1 MiB first), gradient_as_bucket_view=False, rebuilt after step 1"]
            if config.zero == 1:
                self.traced.append("ZeRO-1: torch's ZeroRedundancyOptimizer, rank 0's share of the optimizer states")
            self.modelled = []
        else:
            reshard = "True" if config.zero == 3 else "False"
            where = f"world size {dp}"
            if config.shard_group and config.shard_group < dp:
                where = (f"world size {dp} as HSDP: a 2-D DeviceMesh ({dp // config.shard_group} replicas x "
                         f"{config.shard_group} shards), sharded within {config.shard_group} ranks, gradients "
                         "all-reduced across the replicas")
            precision = ("MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): parameters gathered in "
                         "bf16 and gradients reduced in fp32, no autocast (torchtitan's)" if config.fsdp_casts else
                         "MixedPrecisionPolicy(): parameters gathered and gradients reduced in their stored dtype, "
                         "autocast casting (as memtui's live runs)")
            self.traced = [f"FSDP2 fully_shard per decoder layer and root at {where} (rank 0 of a fake process "
                           f"group), reshard_after_forward={reshard}, {precision}"]
            if config.quant == "nf4":
                self.traced.append(QLORA_FSDP2)
            if config.offload != "none":
                self.traced += [CPU_OFFLOAD, *cpu_offload_lines(config)]
            self.modelled = []

    # ---- run_fake_steps' hooks ----------------------------------------------
    def wrap(self, model: torch.nn.Module, tracker: MemoryTracker) -> torch.nn.Module:
        """The model wrapped for this rank. DDP runs under the tracker so its first buckets are logged; FSDP2's
        shards are registered as the weights afterwards (the copies it makes while sharding are not the step's)."""
        self.tracker = tracker
        if self.config.deepspeed_offload:
            from memtui.engine.trace.fake_step import traced_micro_batches
            from memtui.engine.trace.zero_offload import ZeroOffloadOptimizer

            with tracker:  # deepspeed.initialize: the flat buffer made, the parameters its views
                self.zero_offload = ZeroOffloadOptimizer(model, tracker, self.config.dp, self.config.zero,
                                                        traced_micro_batches(self.config))
            if self.zero_offload.loss_scaler() is not None:
                self.traced.append("DeepSpeed's fp16 engine: the loss multiplied by its dynamic loss scale (2^16) "
                                   "for backward, the overflow checked per gradient, the unscaling on the host")
            return model
        if self.config.zero <= 1:
            with tracker:
                return self._ddp(model)
        self.model = self._fsdp(model)
        if self.config.offload != "none":
            for parameter in self.model.parameters():
                tracker.mark_host(parameter)  # CPUOffloadPolicy's shards
        return self.model

    def shard_optimizer(self, model: torch.nn.Module, optimizer):
        """Record the gradients the optimizer steps on: FSDP2 assigns its sharded .grad outside autograd."""
        if self.zero_offload is not None:
            attached = self.zero_offload.attach(optimizer)
            host = type(attached.inner).__name__
            self.traced.append(f"the host optimizer: {host} over the fp32 partition (DeepSpeedCPU"
                               f"{'Adam' if host == 'AdamW' else host}'s stand-in)")
            return attached
        if self.config.zero == 1:
            from memtui.engine.torchside.sharding import zero_redundancy

            sharded = zero_redundancy(optimizer, self.mesh.get_group() if self.config.tp > 1 else None)
            if sharded is optimizer:
                self.traced[-1] = (f"ZeRO-1: not sharded: {type(optimizer).__name__} is memtui's own optimizer "
                                   "wrapper, which ZeroRedundancyOptimizer cannot take (memtui's live runs keep it whole too)")
            optimizer = sharded
        record_stepped_gradients(model, optimizer, self.tracker, self.gradient_ids)
        return steps_on_the_host(optimizer, self.tracker) if self.config.offload != "none" else optimizer

    def loss_scaler(self):
        """DeepSpeed's fp16 loss scaler for the training loop (its engine.backward scales the loss), or None."""
        return self.zero_offload.loss_scaler() if self.zero_offload is not None else None

    def watching(self, tracker: MemoryTracker) -> contextlib.AbstractContextManager:
        if self.config.zero < 2 or self.zero_offload is not None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(fsdp_storage_resizes(tracker, self.gathered_ids))
        if self.config.offload != "none":
            stack.enter_context(cpu_offload_copies(tracker))
        return stack

    def relabel(self, log: MemoryLog) -> None:
        """Categories by owner for what the wrappers allocate (classify() sees only the phase they were made in)."""
        for alloc_id in self.gathered_ids:
            log.allocations[alloc_id].category = "weights"
        for alloc_id in self.gradient_ids:
            log.allocations[alloc_id].category = "gradients"
        for alloc_id in self.bucket_ids:  # the estimator's DDP term is a temporary of every moment
            log.allocations[alloc_id].category = "temporary"
        for alloc_id in self.zero_offload.device_ids if self.zero_offload is not None else ():
            log.allocations[alloc_id].category = "gradients"  # DeepSpeed's ipg bucket and offload buffer
        if self.model is not None:
            name_fsdp_streams(self.model, self.tracker)

    # ---- the wrappers ---------------------------------------------------------
    def _ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.config.tp == 1:
            return ddp_wrap(model, self.tracker, self.config.dp, self.bucket_ids)
        # Beside tensor parallelism, as PyTorch composes them (torch.distributed.tensor.parallel.ddp, its TP + DDP
        # tests): the DTensor parameters made local for DDP, which all-reduces this rank's shards over the dp group.
        from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform

        _pre_dp_module_transform(model)
        return ddp_wrap(model, self.tracker, self.config.dp, self.bucket_ids, process_group=self.mesh.get_group())

    def _fsdp(self, model: torch.nn.Module) -> torch.nn.Module:
        from memtui.engine.torchside.sharding import fsdp_policy

        return fully_shard_layers(model, self.num_layers, self.mesh, reshard=self.config.zero == 3,
                                  policy=fsdp_policy(self.config), offload=self.config.offload != "none")


def ddp_wrap(model: torch.nn.Module, tracker: MemoryTracker, dp: int, bucket_ids: set[int],
             process_group=None) -> torch.nn.Module:
    """`model` in DistributedDataParallel as memtui's live runs wrap it (25 MiB buckets, the default 1 MiB first
    one, gradient_as_bucket_view=False) over `process_group` (default: the world) of `dp` ranks; each bucket's
    allocation is added to `bucket_ids` as it is reduced."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # init_sync=False: the shape check and the weights' broadcast read data; they allocate nothing that stays.
    # bucket_cap_mb left at None: its default (25 MiB) with the 1 MiB first bucket, which an explicit 25 turns off.
    wrapped = DistributedDataParallel(model, process_group=process_group, init_sync=False,
                                      gradient_as_bucket_view=False)

    def all_reduce_in_place(_state, bucket):
        # The C++ default hook expects the work's future to hold the reduced tensor; the fake backend's holds
        # None. Reducing in place and returning the bucket is what NCCL's all-reduce does, allocating nothing.
        buffer = bucket.buffer()
        alloc_id = tracker.alloc_id_of(buffer)
        if alloc_id is not None:
            bucket_ids.add(alloc_id)
        buffer.div_(dp)
        dist.all_reduce(buffer, group=process_group)
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(buffer)
        return future

    wrapped.register_comm_hook(None, all_reduce_in_place)
    pre_forward = wrapped._pre_forward

    def pre_forward_with_real_indices(*args, **kwargs):
        with _RealIndexTensors():  # the bucket rebuild before step 2's forward
            return pre_forward(*args, **kwargs)

    wrapped._pre_forward = pre_forward_with_real_indices
    return wrapped


def fully_shard_layers(model: torch.nn.Module, num_layers: int, mesh, *, reshard: bool, policy=None,
                       offload: bool = False) -> torch.nn.Module:
    """FSDP2 as torchtitan applies it: `fully_shard` on each of the `num_layers` decoder layers, then on the model
    (the root group: what no layer holds), with `policy` (default MixedPrecisionPolicy(): gathered and reduced in
    the stored dtype); `offload`: CPUOffloadPolicy on every group, unpinned (fake tensors cannot be pinned; pinning
    is the host's, the device allocates the same)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = policy or MixedPrecisionPolicy()
    placement = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
    for layer in _decoder_layers(model, num_layers):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=placement)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=placement)
    return model


# FSDP2's communication streams (FSDPCommContext.lazy_init), each with pools of its own in the caching allocator:
# the all-gather output is made on the copy-in stream (foreach_all_gather), the reduce-scatter output, which the
# sharded gradients are views of until zero_grad, on the reduce-scatter stream (foreach_reduce).
_FSDP_STREAMS = {"all_gather_copy_in_stream": "FSDP2 all-gather copy-in", "all_gather_stream": "FSDP2 all-gather",
                 "reduce_scatter_stream": "FSDP2 reduce-scatter", "all_reduce_stream": "FSDP2 all-reduce"}


def name_fsdp_streams(model: torch.nn.Module, tracker: MemoryTracker) -> None:
    """Name in the tracker's log the streams of the FSDP2 root `model`."""
    state = getattr(model, "_get_fsdp_state", None)
    context = getattr(state(), "_comm_ctx", None) if state is not None else None
    for attribute, name in _FSDP_STREAMS.items():
        stream = getattr(context, attribute, None)
        if stream is not None:
            tracker.name_stream(stream, name)


def steps_on_the_host(optimizer, tracker: MemoryTracker):
    """`optimizer`, its step run as CPUOffloadPolicy runs it: on the host shards and gradients, its states and
    temporaries in host memory."""
    step = optimizer.step

    def step_on_the_host(*args, **kwargs):
        with tracker.model_states_on_host():  # the states and the step's temporaries are the CPU's
            return step(*args, **kwargs)

    optimizer.step = step_on_the_host
    return optimizer


def record_stepped_gradients(model: torch.nn.Module, optimizer, tracker: MemoryTracker, gradient_ids: set[int]) -> None:
    """Add to `gradient_ids` the allocation of every gradient the optimizer steps on, as each step begins: the
    ones assigned outside autograd's accumulation hook (FSDP2's shards, DTensor's replicated ones) included."""

    def note_gradients(_optimizer, _args, _kwargs) -> None:
        for parameter in model.parameters():
            if parameter.grad is not None:
                alloc_id = tracker.alloc_id_of(parameter.grad)
                if alloc_id is not None:
                    gradient_ids.add(alloc_id)

    optimizer.register_step_pre_hook(note_gradients)


class _RealIndexTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Integer tensors made real: DDP's bucket rebuild broadcasts the bucket indices and reads them back."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.empty.memory_format and kwargs.get("dtype") in (torch.int32, torch.int64):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fsdp_storage_resizes(tracker: MemoryTracker, gathered: set[int] | None = None) -> Iterator[None]:
    """Show the tracker FSDP2's in-place frees and re-allocations of unsharded parameters; add every unsharded
    parameter's allocation to `gathered`. The trace and the live CPU measurement both use it.

    FSDP2 resizes each unsharded parameter's storage to 0 bytes after use and back at the next all-gather
    (`alloc_storage` / `free_storage`); on CUDA the caching allocator sees both, but a dispatch mode sees
    neither, so a CPU measurement would keep them forever.
    """
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    except ImportError:  # another torch layout: measure without (the figure then over-counts FSDP2)
        yield
        return

    gathered = gathered if gathered is not None else set()

    originals = {"alloc_storage": _fsdp_param.alloc_storage, "free_storage": _fsdp_param.free_storage}

    def watched(name: str):
        original = originals[name]

        def resize(tensor: torch.Tensor) -> None:
            before = tracker.alloc_id_of(tensor)
            if before is not None:
                gathered.add(before)  # made by FSDP2's lazy init: the first unsharded copy
            original(tensor)
            tracker.storage_resized(tensor, f"fsdp_{name}")
            after = tracker.alloc_id_of(tensor)
            if after is not None:
                gathered.add(after)

        return resize

    patched = [(module, name) for module in (_fsdp_param, _fsdp_param_group) for name in originals
               if getattr(module, name, None) is originals[name]]
    for module, name in patched:
        setattr(module, name, watched(name))
    try:
        yield
    finally:
        for module, name in patched:
            setattr(module, name, originals[name])


@contextlib.contextmanager
def cpu_offload_copies(tracker: MemoryTracker) -> Iterator[None]:
    """The copies CPUOffloadPolicy makes between host and device, which the CPU device the trace runs on makes as
    no-ops (`.to(device)` onto the same device returns the tensor): each shard copied to the device for its
    all-gather (FSDPParam.all_gather_inputs), and each reduced gradient copied to host memory in foreach_reduce,
    the device's reduce-scatter output then let go (FSDP2 keeps no reference to it)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    inputs = _fsdp_param.FSDPParam.all_gather_inputs
    reduce = _fsdp_param_group.foreach_reduce

    def to_device(fsdp_param):
        gathered = inputs.fget(fsdp_param)
        return [tensor.clone() for tensor in gathered] if fsdp_param.offload_to_cpu else gathered

    def reduce_to_host(fsdp_params, *args, **kwargs):
        # Gradient accumulation: a shard that has a gradient already gets the new one added in place into it (on
        # the host, from foreach_reduce's copy of the reduced shard); only a new one is a view of the device's output.
        accumulated = {id(fsdp_param) for fsdp_param in fsdp_params if fsdp_param.sharded_param.grad is not None}
        result = reduce(fsdp_params, *args, **kwargs)
        for fsdp_param in fsdp_params:
            grad = fsdp_param.sharded_param.grad
            if fsdp_param.offload_to_cpu and grad is not None and id(fsdp_param) not in accumulated:
                with tracker.model_states_on_host():
                    host = grad.to_local().clone()
                fsdp_param.sharded_param.grad = fsdp_param.to_sharded_dtensor(host)
        return result

    _fsdp_param.FSDPParam.all_gather_inputs = property(to_device)
    _fsdp_param_group.foreach_reduce = reduce_to_host
    try:
        yield
    finally:
        _fsdp_param.FSDPParam.all_gather_inputs = inputs
        _fsdp_param_group.foreach_reduce = reduce


def tensor_data_meshes(config: TrainingConfig):
    """(tp mesh, dp mesh) of a job of dp x tp ranks, tp innermost (the ranks of one tensor-parallel group adjacent, as
    torchtitan's ParallelDims and Megatron-LM lay them out): a (dp, tp) DeviceMesh, or for HSDP torchtitan's
    (dp_replicate, dp_shard, tp), FSDP2 then on its 2-D (dp_replicate, dp_shard) part. Made outside FakeTensorMode."""
    from torch.distributed.device_mesh import init_device_mesh

    group = config.shard_ranks
    if config.zero >= 2 and group < config.dp:
        mesh = init_device_mesh("cpu", (config.dp // group, group, config.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        return mesh["tp"], mesh["dp_replicate", "dp_shard"]
    mesh = init_device_mesh("cpu", (config.dp, config.tp), mesh_dim_names=("dp", "tp"))
    return mesh["tp"], mesh["dp"]


def tensor_data_lines(config: TrainingConfig, lines: list[str]) -> list[str]:
    """DataParallel's `traced` lines as they read beside tensor parallelism (tensor_data_meshes' meshes)."""
    dp, tp = config.dp, config.tp
    if config.zero <= 1:
        ddp = (f"DDP over the dp group (dp {dp}) of a (dp, tp) mesh, beside tp {tp} as PyTorch composes them: "
               "torch.distributed.tensor.parallel.ddp._pre_dp_module_transform makes the DTensor parameters local "
               "for DDP, which buckets and all-reduces this rank's shards (Megatron-LM's TP + DP layout; torchtitan "
               "refuses DDP beside TP)")
        return [line.replace(f"DDP at world size {dp} (rank 0 of a fake process group)", ddp)
                .replace("ZeroRedundancyOptimizer, rank 0's", "ZeroRedundancyOptimizer over the dp group, this rank's")
                for line in lines]
    if config.shard_ranks < dp:
        return [line.replace(f"world size {dp} as HSDP: a 2-D DeviceMesh",
                             f"dp {dp} as HSDP: the (dp_replicate, dp_shard) part of torchtitan's (dp_replicate, "
                             f"dp_shard, tp {tp}) mesh") for line in lines]
    return [line.replace(f"world size {dp}", f"dp {dp} of a (dp, tp) mesh") for line in lines]


@contextlib.contextmanager
def data_parallel(config: TrainingConfig, num_layers: int) -> Iterator[DataParallel]:
    """Rank 0 of a fake process group of config.dp ranks, torn down on the way out (so the next trace can start
    another); the device mesh is made here, outside FakeTensorMode, as it must be."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; the trace needs its own")
    dist.init_process_group("fake", rank=0, world_size=config.dp, store=FakeStore())
    try:
        group = config.shard_ranks
        if group < config.dp:  # HSDP, as torchtitan builds it: replicate on the outer dimension, shard on the inner
            mesh = init_device_mesh("cpu", (config.dp // group, group), mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            mesh = init_device_mesh("cpu", (config.dp,))
        yield DataParallel(config, num_layers, mesh)
    finally:
        dist.destroy_process_group()
