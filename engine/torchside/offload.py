"""--activation-offload: torchtune's OffloadActivations (torchtune/training/_activation_offloading.py).

A saved_tensors_hooks pair around the decoder's forward (embeddings, layers, final norm; torchtune turns it off
for the output head with a NoOpManager, and computes the loss outside it). The pack hook copies each tensor
autograd saves to CPU memory (pinned) and keeps only the copy, unless it is a Parameter (or Buffer), smaller
than min_offload_size (1024 bytes), or not on the accelerator; the unpack hook, when backward needs it, copies it
back to the device (a new allocation, alive while that node's backward runs) and lets the host copy go.
Each save is packed on its own: a tensor saved by two nodes is copied twice.

What memtui runs is torchtune's single-stream path (use_streams=False). Its default, use_streams=True, overlaps
the copies on a second stream and so keeps up to max_fwd_stash_size (5) of the last offloaded tensors alive in
forward until their copies are done, and each unpacked tensor until the next node's backward starts; memtui does
not model those few tensors in flight.

Under --compile (torchtune compiles each layer inside these hooks) a layer is one autograd node: AOTAutograd's
CompiledFunction saves the partitioner's choice with ctx.save_for_backward, so that set is what is packed, and the
weights among it are the Parameters themselves (dynamo marks them static inputs, which the partitioner saves for
free), which stay. Its backward unpacks them all at once (ctx.saved_tensors) and frees each at its last use.
With use_streams the stash would keep a whole layer's copies, and the previous layer's, until the node is done.

Under activation checkpointing (which torchtune's recipes require with offloading) the checkpoint's own hooks
are innermost inside a region, so only what the region saves for itself (its inputs) is offloaded; the
recompute runs in backward, outside these hooks, on the device.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks

from memtui.engine.torchside.optim import memory_kind

MIN_OFFLOAD_BYTES = 1024  # OffloadActivations' min_offload_size default


def host_memory():
    """Tensors made inside are host (pinned CPU) memory, not the device's (see memory_kind)."""
    return memory_kind("host_memory")


class OffloadActivations(saved_tensors_hooks):
    """torchtune's pack/unpack, single stream. `device_type`: the accelerator the step runs on; "cpu" in the trace
    (fake tensors stand for the GPU's) and in a live CPU run, where the host copy and the copy back are real
    copies within the same memory (a no-op in effect, made so the measurement follows the GPU's program)."""

    def __init__(self, device_type: str, *, pin_memory: bool = True) -> None:
        self.device_type = device_type
        self.pin_memory = pin_memory and device_type == "cuda"
        self.offloaded_bytes = 0  # host bytes alive now
        self.peak_offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        nbytes = tensor.element_size() * tensor.nelement()
        if (tensor.device.type != self.device_type or nbytes < MIN_OFFLOAD_BYTES
                or isinstance(tensor, torch.nn.Parameter)
                or (hasattr(torch.nn, "Buffer") and isinstance(tensor, torch.nn.Buffer))):
            return tensor, False
        with host_memory():
            host = torch.empty_like(tensor, device="cpu", pin_memory=self.pin_memory)
            host.copy_(tensor, non_blocking=self.pin_memory)
        self.offloaded_bytes += nbytes
        self.peak_offloaded_bytes = max(self.peak_offloaded_bytes, self.offloaded_bytes)
        return host, True

    def _unpack(self, packed):
        tensor, moved = packed
        if not moved:
            return tensor
        self.offloaded_bytes -= tensor.element_size() * tensor.nelement()
        if self.device_type == "cpu":
            return tensor.clone()  # the copy back: a new device allocation
        return tensor.to(self.device_type, non_blocking=True)


def offload_decoder_activations(model, device_type: str) -> OffloadActivations:
    """Offload what the decoder saves (not the head's or the loss's, as torchtune); the hooks are pushed when the
    decoder's forward starts and popped when it ends."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal, causal.base_model_prefix)
    hooks = OffloadActivations(device_type)
    decoder.register_forward_pre_hook(lambda *_: hooks.__enter__())
    decoder.register_forward_hook(lambda *_: hooks.__exit__(None, None, None), always_call=True)
    return hooks
