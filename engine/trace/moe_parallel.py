"""Tensor parallelism of a mixture-of-experts block, as torchtitan shards MoE layers with TP and no expert
parallelism (its MoE sharding for the dense TP axis: routed experts' weights Shard(1)/Shard(2), the router
replicated, the block's input all-gathered from the sequence and its Partial output reduce-scattered back).

On transformers' modules (MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, GptOssMLP, DeepseekV3MoE):

- the block (`mlp`): its input all-gathered from Shard(1) to Replicate and handed on as a local tensor whose
  gradient is Partial (the backward reduce-scatters it, as torchtitan's experts' in_grad_placements say); its
  output, each rank's partial sum over its share of the intermediate dimension, reduce-scattered onto Shard(1);
- the router (`gate`; gpt-oss's `router`, with its bias): replicated DTensors, run on the whole sequence's local
  tokens;
- the experts: the stacked `gate_up_proj` (experts, 2 x intermediate, hidden) sharded on its intermediate rows,
  reordered rank-major first so that each rank's contiguous block is its own share of gate and of up (as the
  dense plan does for Phi-3's fused gate_up_proj), and `down_proj` (experts, hidden, intermediate) on its
  intermediate columns. The module's own forward (transformers' grouped_mm experts) runs on the local shards,
  so every allocation is the one a rank makes; the gradients land in the DTensor parameters' local shards.
  gpt-oss's experts are transposed, gate and up interleaved column by column: `gate_up_proj` (experts, hidden,
  2 x intermediate) and its bias on their columns as they are (a contiguous block is a rank's pairs), `down_proj`
  (experts, intermediate, hidden) on its rows, its bias replicated; its attention sinks sharded with the heads.
- DeepSeek-V3's shared experts: a dense MLP (Colwise gate/up, Rowwise down) whose partial output is summed with the
  routed experts' before the one reduce-scatter; its latent attention as torchtitan's plan (the low-rank and
  compressed projections and their norms replicated, the up-projections Colwise on the heads).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

MOE_TRACED_LINE = ("MoE blocks as torchtitan's TP plan without expert parallelism: input all-gathered, router "
                   "replicated, experts' stacked gate_up_proj and down_proj sharded on the intermediate dimension "
                   "(each rank its share of gate and of up) and run on the local shards, the partial output "
                   "reduce-scattered")


def moe_traced_lines(model: torch.nn.Module) -> list[str]:
    """What the trace says of the plan's MoE parts for this model (nothing for a dense one)."""
    decoder = getattr(model, "model", None)  # GPT-2's decoder is `transformer`: dense
    if decoder is None:
        return []
    layers = decoder.layers
    return moe_plan_lines(routed=any(is_moe_block(getattr(layer, "mlp", None)) for layer in layers),
                          shared=any(hasattr(getattr(layer, "mlp", None), "shared_experts") for layer in layers),
                          latent=any(hasattr(layer.self_attn, "kv_b_proj") for layer in layers))


def moe_plan_lines(*, routed: bool, shared: bool, latent: bool) -> list[str]:
    """The plan's MoE lines: routed experts, DeepSeek-V3's shared experts, its latent attention."""
    lines = [MOE_TRACED_LINE] if routed else []
    if shared:
        lines.append("DeepSeek-V3's shared experts Colwise gate/up and Rowwise down, their partial output summed "
                     "with the routed experts' before the block's reduce-scatter")
    if latent:
        lines.append("latent attention as torchtitan's DeepSeek-V3 plan: q_a_proj, kv_a_proj_with_mqa and their norms "
                     "replicated (NoParallel), q_b_proj and kv_b_proj Colwise on the heads, o_proj Rowwise")
    return lines


def is_moe_block(module: torch.nn.Module | None) -> bool:
    """transformers' sparse MoE block: stacked `experts` and a router (`gate`: Mixtral, Qwen3-MoE; `router`:
    gpt-oss)."""
    return module is not None and hasattr(module, "experts") and (hasattr(module, "gate") or hasattr(module, "router"))


def moe_block_plan(mlp: torch.nn.Module, tp: int) -> dict:
    """parallelize_module's plan for one layer's MoE block (keys relative to the decoder layer)."""
    experts = mlp.experts
    if getattr(experts, "is_transposed", False):
        # gpt-oss: gate_up_proj (experts, hidden, 2 x intermediate) with gate and up interleaved column by column,
        # so a contiguous block of columns is already a rank's pairs; down_proj (experts, intermediate, hidden).
        # The down projection's bias is added to every rank's partial sum (replicated, as torchtitan's gpt-oss
        # plan keeps it).
        return {
            "mlp": MoeBlockParallel(),
            "mlp.router": LocalShards({"weight": Replicate(), "bias": Replicate()}),
            "mlp.experts": LocalShards({"gate_up_proj": Shard(2), "gate_up_proj_bias": Shard(1),
                                        "down_proj": Shard(1), "down_proj_bias": Replicate()}),
        }
    intermediate = experts.gate_up_proj.shape[1] // 2
    _reorder_rank_major(experts, "gate_up_proj", dim=1, parts=[intermediate, intermediate], tp=tp)
    # DeepSeek-V3's shared experts: a dense MLP on the same gathered input, its output left partial to be summed
    # with the routed experts' before the one reduce-scatter (torchtitan's shared_experts plan)
    shared = {"mlp.shared_experts.gate_proj": ColwiseParallel(), "mlp.shared_experts.up_proj": ColwiseParallel(),
              "mlp.shared_experts.down_proj": RowwiseParallel(output_layouts=Partial())
              } if hasattr(mlp, "shared_experts") else {}
    return {
        "mlp": MoeBlockParallel(),
        "mlp.gate": LocalShards({"weight": Replicate()}),
        "mlp.experts": LocalShards({"gate_up_proj": Shard(1), "down_proj": Shard(2)}),
        **shared,
    }


def latent_attention_plan(attention: torch.nn.Module) -> dict:
    """DeepSeek-V3's multi-head latent attention as torchtitan's DeepSeek-V3 plan: the low-rank query and the
    compressed key/value projections and their norms replicated (NoParallel), the up-projections (q_b_proj or
    q_proj, kv_b_proj) Colwise on the heads; o_proj is the dense plan's Rowwise."""
    low_rank = hasattr(attention, "q_a_proj") and attention.q_a_proj is not None
    query = ({"self_attn.q_a_proj": NoParallel(), "self_attn.q_a_layernorm": NoParallel(),
              "self_attn.q_b_proj": ColwiseParallel()} if low_rank else {"self_attn.q_proj": ColwiseParallel()})
    return {**query, "self_attn.kv_a_proj_with_mqa": NoParallel(), "self_attn.kv_a_layernorm": NoParallel(),
            "self_attn.kv_b_proj": ColwiseParallel()}


def attention_sinks_plan(attention: torch.nn.Module) -> dict:
    """gpt-oss's per-head attention sinks sharded with the heads (each rank's softmax takes its own heads' sinks)."""
    return {"self_attn": LocalShards({"sinks": Shard(0)})} if hasattr(attention, "sinks") else {}


def _reorder_rank_major(module: torch.nn.Module, name: str, dim: int, parts: list[int], tp: int) -> None:
    """`module.name`'s slices along `dim` (the parts stacked) reordered rank-major: every part's first 1/tp, then
    every part's second 1/tp, and so on, so that Shard(dim)'s contiguous block r holds rank r's share of each."""
    starts = [sum(parts[:index]) for index in range(len(parts))]
    order = torch.cat([torch.arange(start + rank * size // tp, start + (rank + 1) * size // tp)
                       for rank in range(tp) for start, size in zip(starts, parts)])
    tensor = getattr(module, name)
    with torch.no_grad():
        setattr(module, name, torch.nn.Parameter(tensor.index_select(dim, order), requires_grad=tensor.requires_grad))


class LocalShards(ParallelStyle):
    """A ParallelStyle: the named parameters distributed with these placements (DTensor Parameters, which FSDP2
    can shard further over dp), and the module's own forward run on their local shards (DTensor.to_local: a view
    whose gradient lands in the parameter's shard), as torchtitan's GroupedExperts computes on local weights."""

    def __init__(self, placements: dict) -> None:
        super().__init__()
        self.placements = placements

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        names = [name for name in self.placements if module._parameters.get(name) is not None]
        for name in names:
            param = module._parameters[name]
            sharded = distribute_tensor(param.data, device_mesh, [self.placements[name]])
            module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))
        forward = module.forward

        def local_forward(*args, **kwargs):
            # read at call time: FSDP2 sets its unsharded (TP-sharded) parameters before the layer runs
            held = {name: module._parameters[name] for name in names}
            try:
                for name, param in held.items():
                    module._parameters[name] = param.to_local() if isinstance(param, DTensor) else param
                return forward(*args, **kwargs)
            finally:
                module._parameters.update(held)

        module.forward = local_forward
        return module


class MoeBlockParallel(ParallelStyle):
    """A ParallelStyle for the MoE block: input Shard(1) all-gathered to Replicate (local, its gradient Partial),
    output Partial reduce-scattered to Shard(1) (local), torchtitan's MoE boundary under sequence parallelism."""

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        def gather(_module, args):
            x, *rest = args
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [Shard(1)], run_check=False)
            x = x.redistribute(device_mesh, [Replicate()])
            return (x.to_local(grad_placements=[Partial()]), *rest)

        def scatter(_module, _args, output):
            hidden, *rest = output if isinstance(output, tuple) else (output,)  # gpt-oss: (hidden, router scores)
            partial = DTensor.from_local(hidden, device_mesh, [Partial()], run_check=False)
            scattered = partial.redistribute(device_mesh, [Shard(1)]).to_local()
            return (scattered, *rest) if isinstance(output, tuple) else scattered

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(scatter)
        return module


class NoParallel(ParallelStyle):
    """torchtitan's NoParallel: the module's parameters replicated DTensors, its input taken as (or redistributed
    to) Replicate, its output handed on local: a replicated computation on the tensor-parallel mesh."""

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        def replicate(_module, args, mesh):
            x, *rest = args
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            return (x.redistribute(mesh, [Replicate()]), *rest)

        def local(_module, output, _mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, input_fn=replicate, output_fn=local)
