"""DeepSpeed's ZeRO-Offload for ZeRO-1 and ZeRO-2 (zero_optimization.offload_optimizer.device=cpu), as a torch
stand-in for `memtui trace`: DeepSpeed is no dependency of memtui (its CPU Adam is a compiled op).

It makes the device allocations DeepSpeedZeroOptimizer makes (deepspeed/runtime/zero/stage_1_and_2.py of
DeepSpeed 0.19.6, commit edaa722), with the defaults of deepspeed/runtime/zero/config.py (reduce_bucket_size
5e8 elements, contiguous_gradients, which offload forces on anyway; overlap_comm off for stages 1 and 2;
reduce_scatter and use_multi_rank_bucket_allreduce on), over one parameter group:

- __init__: the trainable parameters flattened into one buffer of the model's dtype, padded to a multiple of
  2 x dp elements (flatten_dense_tensors_aligned; the parameters become views of it), and
  temp_grad_buffer_for_gpu_offload, one largest parameter's worth; on the host the fp32 partition (the masters),
  its fp32 gradient, a 16-bit copy of the partition and the optimizer's states;
- backward: the first gradient hook allocates the ipg bucket (setup_buckets: reduce_bucket_size elements of the
  model's dtype). ZeRO-2 copies each gradient into it as it is made (its own storage freed); ZeRO-1 leaves the
  gradients whole until backward's end (the engine's post-backward reduce_gradients copies them in, in the
  group's order). A bucket that would overflow is reduced first (reduce_ipg_grads: average_tensor flattens the
  partitions' slices of it into one tensor unless they are one, all-reduces and copies back); then each gradient
  in rank 0's partition gets its fp64 norm (kept until the step), the overflow check (_has_inf_or_nan: fp32,
  isnan, isinf, or, fp32 of the whole gradient) and its partition slice cast to fp32 and copied to the host
  partition's gradient, and goes; ZeRO-2 lets the others' go too. A parameter larger than the bucket is reduced
  in place of its own gradient. The post-backward epilogue reduces the rest and frees the bucket;
- gradient accumulation (gradient_accumulation_steps): ZeRO-1 reduces only at the boundary (the bucket, made by
  the first micro-batch, and the gradients autograd sums in .grad stay until then); ZeRO-2 reduces each micro-batch,
  and before the boundary each gradient of rank 0's partition is only summed on the host
  (async_accumulate_grad_in_cpu_via_gpu: the sum so far brought back through temp_grad_buffer_for_gpu_offload and
  added in place) and left to the epilogue, which clears .grad;
- step: the overflow flag and the norm all-reduced through one-element device tensors, the optimizer stepping on
  the host, the updated 16-bit partition copied into its slice of the flat buffer and all-gathered in place.
"""

from __future__ import annotations

import torch

# deepspeed/runtime/zero/config.py's reduce_bucket_size; the flat buffer's padding to nccl_start_alignment_factor x dp
from memtui.engine.estimator.zero_offload import REDUCE_BUCKET_SIZE, flat_padding

DEEPSPEED_OFFLOAD = ("DeepSpeed ZeRO-Offload (zero_optimization.offload_optimizer.device=cpu), ZeRO-{stage} at "
                     "world size {dp} (rank 0 of a fake process group) as DeepSpeed 0.19.6's DeepSpeedZeroOptimizer "
                     "allocates it (a torch stand-in: DeepSpeed is not installed): the trainable parameters in one flat buffer, the {bucket:,}-element ipg gradient "
                     "bucket (reduce_bucket_size's default) through backward, each gradient of this rank's "
                     "partition normed, checked for overflow and copied to the host as fp32; the fp32 masters, "
                     "their gradients and the optimizer's states on the host, the updated 16-bit partition "
                     "copied back and all-gathered")


class DynamicLossScaler:
    """DeepSpeed's fp16 engine (fp16.enabled, loss_scale 0: dynamic): engine.backward multiplies the loss by the
    current scale, a Python float (DynamicLossScaler.scale_loss); the overflow check is the optimizer's own
    (local_overflow, above), the unscaling is on the host (unscale_and_clip_grads), update_scale is Python."""

    def __init__(self) -> None:
        self.cur_scale = 2.0 ** 16  # initial_scale_power's default

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.cur_scale

    def step(self, optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass


def _has_inf_or_nan(x: torch.Tensor) -> torch.Tensor:
    """DeepSpeedZeroOptimizer._has_inf_or_nan, as it allocates (every intermediate alive until it returns)."""
    float_x = x.float()
    nan = float_x.isnan()
    inf = float_x.isinf()
    inf_or_nan = nan.logical_or(inf)
    return inf_or_nan.float().max()


class ZeroOffloadOptimizer:
    """Rank 0 of `dp` data-parallel ranks under DeepSpeed's ZeRO-`stage` (1 or 2) with the optimizer on the CPU.
    Made around the model (deepspeed.initialize flattens the parameters); `attach` takes the optimizer built for
    them (its hyperparameters for the host one) and hooks the gradients."""

    def __init__(self, model: torch.nn.Module, tracker, dp: int, stage: int, micro_batches: int = 1) -> None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        self.tracker, self.dp, self.stage = tracker, dp, stage
        # Gradient accumulation: the engine's micro_steps (backwards so far) against gradient_accumulation_steps,
        # the optimizer's micro_step_id (INITIAL_MICRO_STEP_ID, -1, raised by each setup_buckets, reset by step)
        self.micro_batches, self.backwards, self.micro_step_id = micro_batches, 0, -1
        self.queued = False  # the engine's post-backward hook, queued once a backward
        self.accumulated: dict[int, torch.Tensor] = {}  # accumulated_grads_in_cpu: each gradient whole, on the host
        self.params = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.dtype = self.params[0].dtype
        self._unflatten = _unflatten_dense_tensors
        self._flatten = _flatten_dense_tensors
        self.device_ids: set[int] = set()  # the flat bucket and temp_grad_buffer_for_gpu_offload: gradients
        # DeepSpeed flattens on the device only where it has room for the flat copy beside the parameters
        # (available_memory() >= the flat buffer), else on the CPU: the parameters moved to the host, a one-element
        # placeholder each, the flat buffer made there and moved to the device. The stand-in takes the CPU path, so
        # that no setup moment holds the weights twice (on a device with the room the copy does not matter).
        self.shapes = [parameter.shape for parameter in self.params]  # round_robin_bit16_meta
        with tracker.model_states_on_host():
            tensors = [parameter.data.clone() for parameter in self.params]
        for parameter in self.params:
            parameter.data = torch.empty(1, dtype=self.dtype)
        with tracker.model_states_on_host():
            numel = sum(tensor.numel() for tensor in tensors)
            if padding := flat_padding(numel, dp):  # align_dense_tensors
                tensors.append(torch.zeros(padding, dtype=self.dtype))
            flat = _flatten_dense_tensors(tensors)
            del tensors
        self.flat = flat.clone().detach()
        del flat
        self._update_model_weights()
        self.partition_size = self.flat.numel() // dp
        self.partitions = [self.flat.narrow(0, rank * self.partition_size, self.partition_size) for rank in range(dp)]
        # Rank 0's partition: the first partition_size elements (get_partition_info, initialize_gradient_partition)
        self.starts: dict[int, int] = {}
        start = 0
        for parameter in self.params:
            self.starts[id(parameter)] = start
            start += parameter.numel()
        largest = max(parameter.numel() for parameter in self.params)
        with tracker.model_states_on_host():
            self.fp32 = self.partitions[0].detach().clone().to(dtype=torch.float32)
            self.bit16_buffer = torch.full(self.fp32.shape, fill_value=0.0, dtype=self.dtype)
            self.fp32.grad = torch.zeros(self.partition_size, dtype=torch.float32)
            self.temp_grad_buffer_for_cpu_offload = torch.zeros(largest, dtype=self.dtype)
        self.temp_grad_buffer_for_gpu_offload = torch.zeros(largest, dtype=self.dtype)
        self._note(self.temp_grad_buffer_for_gpu_offload)
        self.inner: torch.optim.Optimizer | None = None
        self.buffer: torch.Tensor | None = None  # the ipg bucket, between setup_buckets and the epilogue
        self.elements = 0
        self.bucket_params: list[torch.nn.Parameter] = []
        self.extra_large: torch.nn.Parameter | None = None
        self.norms: dict[int, torch.Tensor] = {}  # norm_for_param_grads, on the device until the step

    # ---- the optimizer's face (run_fake_steps, classify_by_owner) ------------------------------------------
    @property
    def param_groups(self) -> list:
        return self.inner.param_groups if self.inner is not None else []

    @property
    def state(self) -> dict:
        return {}  # the host optimizer's states: model states on the host, not the device's

    def attach(self, optimizer) -> ZeroOffloadOptimizer:
        """The host optimizer over the fp32 partition with `optimizer`'s hyperparameters: DeepSpeedCPUAdam's
        stand-in, AdamW, or DeepSpeedCPULion's, memtui's Lion (the ds-config's "Lion"); the gradient hooks (after
        the trace's own, which see autograd's gradients)."""
        from memtui.engine.torchside.optim import Lion

        defaults = dict(optimizer.param_groups[0])
        host = Lion if isinstance(getattr(optimizer, "inner", optimizer), Lion) else torch.optim.AdamW  # MasterWeights wraps
        with self.tracker.model_states_on_host():
            self.inner = host([self.fp32], lr=defaults.get("lr", 1e-4), weight_decay=defaults.get("weight_decay", 0.01),
                              foreach=False)
        for parameter in self.params:
            parameter.register_post_accumulate_grad_hook(self._grad_hook)
        return self

    def loss_scaler(self) -> DynamicLossScaler | None:
        """DeepSpeed's loss scaler where its engine runs in fp16 (bf16 and fp32 need none)."""
        return DynamicLossScaler() if self.dtype == torch.float16 else None

    def _note(self, tensor: torch.Tensor) -> None:
        alloc_id = self.tracker.alloc_id_of(tensor)
        if alloc_id is not None:
            self.device_ids.add(alloc_id)

    def _update_model_weights(self) -> None:
        """_update_model_bit16_weights: each parameter a view of the flat buffer."""
        offset = 0
        for parameter, shape in zip(self.params, self.shapes):
            numel = shape.numel()
            parameter.data = self.flat.narrow(0, offset, numel).view(shape)
            offset += numel

    # ---- backward ---------------------------------------------------------------------------------------------
    def _grad_hook(self, parameter: torch.nn.Parameter) -> None:
        """create_gradient_handling_hooks' grad_handling_hook: process_gradients, and the engine's post-backward
        hook queued behind backward (queue_post_backward_callback)."""
        if self.buffer is None:  # setup_buckets
            self.micro_step_id += 1
            self.buffer = torch.empty(REDUCE_BUCKET_SIZE, dtype=self.dtype)
            self._note(self.buffer)
            self.elements = 0
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._post_backward)
        if self.stage == 2:
            self._reduce_independent(parameter)

    @property
    def boundary(self) -> bool:
        """The engine's is_gradient_accumulation_boundary: this backward is the step's last."""
        return (self.backwards + 1) % self.micro_batches == 0

    def _post_backward(self) -> None:
        """The engine's allreduce_gradients: ZeRO-1's reduce_gradients (every gradient, in the group's order),
        then independent_gradient_partition_epilogue (the rest reduced, the bucket released, .grad cleared).
        ZeRO-1 communicates only at the accumulation boundary: before it the bucket stays (setup_buckets is not
        run again, so micro_step_id stays 0) and autograd adds each micro-batch's gradients into .grad."""
        self.queued = False
        if self.stage == 1 and not self.boundary:
            self.backwards += 1
            return
        if self.stage == 1:
            for parameter in self.params:
                if parameter.grad is not None:
                    self._reduce_independent(parameter)
        self._reduce_ipg()
        self.buffer = None
        for parameter in self.params:
            parameter.grad = None
        self.backwards += 1

    def _reduce_independent(self, parameter: torch.nn.Parameter) -> None:
        """reduce_independent_p_g_buckets_and_remove_grads with contiguous gradients."""
        numel = parameter.numel()
        if self.elements + numel > REDUCE_BUCKET_SIZE:
            self._reduce_ipg()
        grad = parameter.grad
        if numel > REDUCE_BUCKET_SIZE:
            self.extra_large = parameter  # reduced in place of its own gradient
        else:
            new_grad = self.buffer.narrow(0, self.elements, numel)
            new_grad.copy_(grad.view(-1))
            grad.data = new_grad.data.view_as(grad)
        self.elements += numel
        self.bucket_params.append(parameter)

    def _partitions_of(self, parameter: torch.nn.Parameter) -> list[tuple[int, int]]:
        """(partition, offset in the parameter) of every partition the parameter reaches, by offset."""
        start, numel, size = self.starts[id(parameter)], parameter.numel(), self.partition_size
        return [(rank, max(rank * size - start, 0)) for rank in range(self.dp)
                if start < (rank + 1) * size and start + numel > rank * size]

    def _reduce_ipg(self) -> None:
        """reduce_ipg_grads: the bucket (or the extra-large gradient) averaged, then this rank's gradients offloaded."""
        if self.extra_large is not None:
            self._average(self.extra_large.grad.view(-1))
            self.extra_large = None
        elif self.buffer is not None:
            self._average(self.buffer.narrow(0, 0, self.elements))
        for parameter in self.bucket_params:
            in_partition = self.starts[id(parameter)] < self.partition_size
            if in_partition:
                self._copy_grads_in_partition(parameter)
            elif self.stage == 2:
                parameter.grad = None
        self.bucket_params = []
        self.elements = 0

    def _average(self, tensor: torch.Tensor) -> None:
        """average_tensor with reduce_scatter: the partitions' slices of the bucket (neighbours of one partition
        merged), divided, then allreduce_and_scatter over reduce_bucket_size elements at a time."""
        import torch.distributed as dist

        slices: list[list[int]] = []  # [partition, offset in the bucket, elements]
        offset = 0
        for parameter in self.bucket_params:
            reached = self._partitions_of(parameter)
            for index, (rank, start) in enumerate(reached):
                end = reached[index + 1][1] if index + 1 < len(reached) else parameter.numel()
                if slices and slices[-1][0] == rank:
                    slices[-1][2] += end - start
                else:
                    slices.append([rank, offset, end - start])
                offset += end - start
        tensor.div_(self.dp)
        small: list[tuple[int, torch.Tensor]] = []
        numel = 0
        for rank, start, elements in slices:
            small.append((rank, tensor.narrow(0, start, elements)))
            numel += elements
            if numel > REDUCE_BUCKET_SIZE:
                self._allreduce_and_copy(small, dist)
                small, numel = [], 0
        if small:
            self._allreduce_and_copy(small, dist)

    def _allreduce_and_copy(self, small: list[tuple[int, torch.Tensor]], dist) -> None:
        """allreduce_and_copy_with_multiple_ranks: allreduce_bucket's flatten (a copy unless one tensor), the
        all-reduce, and this rank's slices copied back."""
        buffers = [tensor for _rank, tensor in small]
        flat = self._flatten(buffers)
        dist.all_reduce(flat)
        for (rank, buffer), synced in zip(small, self._unflatten(flat, buffers)):
            if rank == 0:
                buffer.copy_(synced)

    def _copy_grads_in_partition(self, parameter: torch.nn.Parameter) -> None:
        """copy_grads_in_partition under CPU offload: with other backwards in the step (before or after this one)
        async_accumulate_grad_in_cpu_via_gpu; at the boundary set_norm_for_param_grad_in_gpu,
        update_offload_overflow_tracker_for_param_grad, async_inplace_copy_grad_to_fp32_buffer_from_gpu. Before
        the boundary the gradient stays (the epilogue clears .grad): a view of the bucket, or a too-large one whole."""
        if self.micro_step_id > 0 or not self.boundary:
            self._accumulate_in_host(parameter)
        if not self.boundary:
            return
        start = self.starts[id(parameter)]
        grad = parameter.grad
        elements = min(parameter.numel(), self.partition_size - start)
        self.norms[id(parameter)] = grad.view(-1).narrow(0, 0, elements).data.double().norm(2)
        _has_inf_or_nan(grad.data)  # a healthy step: the flag stays down (fake tensors have no values to test)
        source = grad.view(-1).narrow(0, 0, elements)
        if source.dtype != torch.float32:
            source = source.to(torch.float32)
        self.fp32.grad.view(-1).narrow(0, start, elements).copy_(source)
        parameter.grad = None

    def _accumulate_in_host(self, parameter: torch.nn.Parameter) -> None:
        """async_accumulate_grad_in_cpu_via_gpu (fp32 masters): the host's sum so far brought back through
        temp_grad_buffer_for_gpu_offload and added into the gradient in place, the sum copied back to the host."""
        key = id(parameter)
        if key not in self.accumulated:  # buffer_to_accumulate_to_in_cpu: the whole gradient, in its dtype
            with self.tracker.model_states_on_host():
                self.accumulated[key] = torch.zeros(parameter.numel(), dtype=parameter.dtype)
        grad = parameter.grad.data.view(-1)
        if self.micro_step_id > 0:
            dest_buffer = self.temp_grad_buffer_for_gpu_offload.view(-1).narrow(0, 0, parameter.numel())
            dest_buffer.copy_(self.accumulated[key].view(-1))
            grad.add_(dest_buffer)
        self.accumulated[key].data.copy_(grad)

    # ---- the step ---------------------------------------------------------------------------------------------
    def step(self) -> None:
        import torch.distributed as dist

        self.micro_step_id = -1
        overflow = torch.zeros(1, dtype=torch.uint8)  # has_overflow: ByteTensor([local_overflow]) all-reduced
        dist.all_reduce(overflow)
        del overflow
        total = torch.zeros(1, dtype=torch.float32)  # complete_grad_norm_calculation_for_cpu_offload
        dist.all_reduce(total)
        del total
        with self.tracker.model_states_on_host():
            norm = torch.linalg.vector_norm(torch.stack([torch.zeros((), dtype=torch.float32)]), ord=2)
            clip = torch.clamp(norm + 1e-6, min=1.0)  # unscale_and_clip_grads (gradient_clipping 1.0)
            self.fp32.grad.mul_(1.0 / (clip * (2.0 ** 16 if self.dtype == torch.float16 else 1.0)))
            self.inner.step()
            self.bit16_buffer.copy_(self.fp32)
        self.partitions[0].copy_(self.bit16_buffer)
        self.norms = {}  # reset_cpu_buffers
        if self.dp > 1:
            dist.all_gather_into_tensor(self.flat, self.partitions[0])
        self._update_model_weights()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.params:
            parameter.grad = None
