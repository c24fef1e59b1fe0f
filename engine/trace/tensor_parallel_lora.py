"""peft's LoRA under tensor parallelism: NVIDIA NeMo Automodel's LoRA-aware parallel styles on peft's layers.

NeMo Automodel (nemo_automodel/components/distributed/parallel_styles.py, `translate_to_lora`) turns every Colwise
and Rowwise style of its plan into a LoRA-aware twin:

- ColwiseParallelLora: the base weight, lora_A and lora_B all Shard(0) (A: r/tp x in, B: out/tp x r); lora_A's
  output, sharded on the rank dimension, is all-gathered (a forward hook) before lora_B, whose output is then
  sharded on the last dimension as the base layer's;
- RowwiseParallelLora: the base weight Shard(1) (its bias replicated), lora_A Shard(1) (r x in/tp) and lora_B
  Shard(1) (out x r/tp): lora_A's output is a partial sum, which DTensor redistributes as lora_B needs;
- SequenceParallelLora: the norms replicated as SequenceParallel replicates them, but left frozen (PyTorch's
  SequenceParallel makes a new nn.Parameter, trainable, of every weight: LoRA would train the norms too).

translate_to_lora turns whatever plan it is given; here it is applied to memtui's plan for each family (for Phi-3
Megatron-LM's per-part cut, not NeMo Automodel's own Phi-3 plan, which leaves the fused attention unsharded):
Phi-3's and GPT-2's fused layers cut per part, lora_B's rows with them; GPT-2's Conv1D base weight cut on its
transposed dimensions; OLMo 2's whole-width q/k norms' SequenceParallel subclass kept frozen; the MoE blocks' own
styles and DeepSeek-V3's NoParallel left as they are (the experts are not adapted, and PyTorch's replication keeps
requires_grad).

NeMo applies them to its own LinearLoRA (an nn.Linear with lora_A and lora_B sub-linears); here they are applied
to peft's lora.Linear (base_layer, lora_A[adapter], lora_B[adapter]), with the same placements and hook, so that
peft's forward (dropout, scaling, dtype casts) runs as the single-GPU trace runs it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

__all__ = ["LORA_TRACED_LINE", "fused_adapter_rows", "lora_aware"]

LORA_TRACED_LINE = ("peft's LoRA under tensor parallelism as NVIDIA NeMo Automodel plans it (translate_to_lora, "
                    "nemo_automodel/components/distributed/parallel_styles.py) on peft's layers: ColwiseParallelLora "
                    "(base weight, lora_A and lora_B Shard(0), lora_A's output all-gathered before lora_B), "
                    "RowwiseParallelLora (base weight, lora_A and lora_B Shard(1), the bias replicated), "
                    "SequenceParallelLora (the norms replicated and left frozen)")


def _distribute(owner: torch.nn.Module, name: str, mesh, src_data_rank, placements) -> None:
    """NeMo Automodel's _distribute_param: the parameter replaced by its DTensor, requires_grad kept."""
    param = getattr(owner, name)
    owner.register_parameter(name, torch.nn.Parameter(
        distribute_tensor(param, mesh, placements, src_data_rank=src_data_rank), requires_grad=param.requires_grad))


def _gather_rank_dimension(_module, _inputs, output):
    """ColwiseParallelLora's lora_a_output_hook: lora_A's output, sharded on r, all-gathered before lora_B."""
    if isinstance(output, DTensor) and any(isinstance(p, Shard) for p in output.placements):
        output = output.redistribute(device_mesh=output.device_mesh, placements=[Replicate()])
    return output


def _conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): its weight (in, out), the transpose of nn.Linear's."""
    return type(module).__name__ == "Conv1D"


class _ColwiseParallelLora(ColwiseParallel):
    """ColwiseParallelLora on peft's lora.Linear: every parameter Shard(0), lora_A's output all-gathered. On GPT-2's
    Conv1D base layer the output dimension is the weight's Shard(1) (the bias's Shard(0)), as Megatron-LM's column cut
    of it; the adapters (nn.Linear) are cut as on any other layer."""

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        def partition(_name, submodule, mesh):
            if submodule is not module:  # the root's call places every parameter, as NeMo's does
                return
            conv = _conv1d(module.get_base_layer())
            for name, _param in list(module.named_parameters()):
                owner, _dot, leaf = name.rpartition(".")
                placement = Shard(1) if conv and name == "base_layer.weight" else Shard(0)
                _distribute(module.get_submodule(owner), leaf, mesh, self.src_data_rank, [placement])
            for lora_a in module.lora_A.values():
                lora_a.register_forward_hook(_gather_rank_dimension)

        return distribute_module(
            module, device_mesh, partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _RowwiseParallelLora(RowwiseParallel):
    """RowwiseParallelLora on peft's lora.Linear: the base weight, lora_A and lora_B Shard(1), the bias replicated
    (a Conv1D base weight's input dimension is its Shard(0))."""

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        self.desired_input_layouts = (Shard(-1),)

        def partition(_name, submodule, mesh):
            if submodule is not module:
                return
            base = module.get_base_layer()
            _distribute(base, "weight", mesh, self.src_data_rank, [Shard(0) if _conv1d(base) else Shard(1)])
            if getattr(base, "bias", None) is not None:
                _distribute(base, "bias", mesh, self.src_data_rank, [Replicate()])
            for adapters in (module.lora_A, module.lora_B):
                for adapter in adapters.values():
                    _distribute(adapter, "weight", mesh, self.src_data_rank, [Shard(1)])

        return distribute_module(
            module, device_mesh, partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _SequenceParallelLora(SequenceParallel):
    """SequenceParallelLora: the replicated parameters keep their requires_grad (frozen under LoRA)."""

    def _replicate_module_fn(self, name: str, module: torch.nn.Module, device_mesh) -> None:
        for param_name, param in module.named_parameters():
            module.register_parameter(param_name, torch.nn.Parameter(
                DTensor.from_local(param, device_mesh, [Replicate()], run_check=False),
                requires_grad=param.requires_grad))


def _twin(style) -> type | None:
    """The LoRA-aware class for this style: Colwise and Rowwise ones (GPT-2's Conv1D styles among them) become
    NeMo's twins; a SequenceParallel subclass (OLMo 2's norm whose output goes back onto the heads) keeps its own
    hooks with SequenceParallelLora's frozen replication."""
    if isinstance(style, SequenceParallel):
        if type(style) is SequenceParallel:
            return _SequenceParallelLora
        return type(f"{type(style).__name__}Lora", (_SequenceParallelLora, type(style)), {})
    if isinstance(style, ColwiseParallel):
        return _ColwiseParallelLora
    if isinstance(style, RowwiseParallel):
        return _RowwiseParallelLora
    return None  # PrepareModuleInput, the MoE block's styles, NoParallel: they keep requires_grad as they are


def lora_aware(root: torch.nn.Module, plan: dict) -> dict:
    """NeMo Automodel's translate_to_lora, where `root` holds peft's LoRA layers: each Colwise, Rowwise or
    SequenceParallel style becomes its LoRA-aware twin (the style's layouts kept); a Colwise or Rowwise one over a
    layer without an adapter (the embedding, an untargeted projection) partitions as before. Without LoRA the plan
    is left as it is."""
    if not any(hasattr(module, "lora_A") for module in root.modules()):
        return plan
    for name, style in plan.items():
        twin = _twin(style)
        if twin is not None and (issubclass(twin, SequenceParallel) or hasattr(root.get_submodule(name), "lora_A")):
            style.__class__ = twin
    return plan


def fused_adapter_rows(linear: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose output rows follow a fused projection's (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn)
    when its rows are reordered rank-major for the Colwise cut: each peft adapter's lora_B (out x r), so that rank
    r's block of B holds the rows of its own q, k and v heads (its share of gate and of up), as the base weight's
    block does; a plain Shard(0) of B would add rank 0's delta to the wrong parts."""
    return list(linear.lora_B.values()) if hasattr(linear, "lora_B") else []
