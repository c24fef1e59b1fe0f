"""GPT-2 under tensor parallelism with sequence parallelism: Megatron-LM's GPT plan on transformers' GPT-2 modules,
with DTensor's `parallelize_module` (memtui.engine.trace.tensor_parallel runs it for model_type "gpt2").

transformers' GPT-2 computes with Conv1D, whose weight is (in, out) and whose forward is addmm(bias, x, weight):

- wte: vocabulary-sharded (RowwiseParallel, as torchtitan's embed_tokens), its output all-reduced: Megatron-LM's
  LanguageModelEmbedding reduce-scatters the word embeddings only without learned positions
  (`reduce_scatter_embeddings`); with them the word embeddings are all-reduced, the position embeddings (wpe,
  replicated, "serial") added on the whole sequence, and the sum scattered onto the sequence
  (`scatter_to_sequence_parallel_region`) before the embedding dropout: here the dropout's input is redistributed
  from Replicate to Shard(1), each rank keeping its 1/tp of the tokens;
- ln_1, ln_2, ln_f: SequenceParallel;
- attn and mlp: their input all-gathered from Shard(1) to Replicate (PrepareModuleInput);
- attn.c_attn ([q; k; v] fused) and mlp.c_fc: column parallel, the Conv1D weight's Shard(1) and the bias's Shard(0);
  c_attn's columns reordered rank-major first, as Megatron-LM's fused QKV is laid out per rank, so that each rank's
  block is its own q, k and v heads (the attention splits its local output by its local width);
- attn.c_proj, mlp.c_proj: row parallel, the weight's Shard(0), the bias replicated and added once, the output
  reduce-scattered onto the sequence;
- lm_head, tied to wte: ColwiseParallel over the vocabulary with loss parallel, as the tied Llama plan.
"""

from __future__ import annotations

import torch


def _conv1d_styles():
    """ColwiseParallel and RowwiseParallel for transformers' Conv1D (weight (in, out)): a column cut is the weight's
    Shard(1) and the bias's Shard(0), a row cut the weight's Shard(0) with the bias replicated."""
    from functools import partial

    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def placed(module, device_mesh, placements: dict[str, object], src_data_rank) -> None:
        for name, placement in placements.items():
            param = getattr(module, name)
            module.register_parameter(name, torch.nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=src_data_rank),
                requires_grad=param.requires_grad))

    class Conv1DColwise(ColwiseParallel):
        def _apply(self, module, device_mesh):
            return distribute_module(
                module, device_mesh,
                lambda _name, mod, mesh: placed(mod, mesh, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    class Conv1DRowwise(RowwiseParallel):
        def _apply(self, module, device_mesh):
            self.desired_input_layouts = (Shard(-1),)
            return distribute_module(
                module, device_mesh,
                lambda _name, mod, mesh: placed(mod, mesh, {"weight": Shard(0), "bias": Replicate()},
                                                self.src_data_rank),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    return Conv1DColwise, Conv1DRowwise


def _replicated():
    """torchtitan's NoParallel: the module's parameters replicated DTensors (so that the optimizer's foreach lists
    are all DTensors), its input taken as replicated and its output handed on local; wpe is "serial" in Megatron-LM,
    every tensor-parallel rank holding it whole and computing its gradient alike."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel.style import ParallelStyle

    def as_replicated(_module, inputs, device_mesh):
        return tuple(DTensor.from_local(tensor, device_mesh, (Replicate(),), run_check=False)
                     if isinstance(tensor, torch.Tensor) and not isinstance(tensor, DTensor) else tensor
                     for tensor in inputs)

    class NoParallel(ParallelStyle):
        def _apply(self, module, device_mesh):
            return distribute_module(module, device_mesh, None, as_replicated,
                                     lambda _module, output, _mesh: output.to_local())

    return NoParallel()


def _rank_major_columns(conv, parts: list[int], tp: int) -> None:
    """The output columns of a Conv1D (its weight's dim 1, its bias) reordered rank-major: every part's first 1/tp,
    then every part's second 1/tp, and so on (as _reorder_rows does for nn.Linear's rows). Under peft's LoRA the
    Conv1D is the lora.Linear's base layer, and each lora_B's rows (nn.Linear: out x r) follow its columns."""
    from memtui.engine.trace.tensor_parallel_lora import fused_adapter_rows

    starts = [sum(parts[:index]) for index in range(len(parts))]
    order = torch.cat([torch.arange(start + rank * size // tp, start + (rank + 1) * size // tp)
                       for rank in range(tp) for start, size in zip(starts, parts)])
    adapters = fused_adapter_rows(conv)
    conv = getattr(conv, "base_layer", conv)
    with torch.no_grad():
        conv.weight = torch.nn.Parameter(conv.weight.index_select(1, order), requires_grad=conv.weight.requires_grad)
        conv.bias = torch.nn.Parameter(conv.bias.index_select(0, order), requires_grad=conv.bias.requires_grad)
        for lora_b in adapters:
            lora_b.weight = torch.nn.Parameter(lora_b.weight.index_select(0, order),
                                               requires_grad=lora_b.weight.requires_grad)


def apply_gpt2_tensor_parallel(model: torch.nn.Module, mesh, *, embedding: bool = True, head: bool = True) -> None:
    """Megatron-LM's GPT-2 plan on GPT2LMHeadModel (`embedding` / `head` False: a pipeline stage without wte, wpe and
    the embedding dropout / without ln_f and lm_head)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from memtui.engine.trace.tensor_parallel_lora import lora_aware

    colwise, rowwise = _conv1d_styles()
    tp = mesh.size()
    transformer = model.transformer
    transformer.sequence_shards = tp  # a later pipeline stage's hidden states: this rank's 1/tp of the tokens
    ends = {}
    if embedding:
        ends["transformer.wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        ends["transformer.wpe"] = _replicated()
        # scatter_to_sequence_parallel_region on the sum of the word and position embeddings, before the dropout
        ends["transformer.drop"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                    use_local_output=True)
    if head:
        ends["transformer.ln_f"] = SequenceParallel()
        ends["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, mesh, lora_aware(model, ends))
    if model.config.tie_word_embeddings and embedding and head:
        model.lm_head.weight = transformer.wte.weight  # both Shard(0) over the vocabulary: one parameter again
    for block in transformer.h:
        attention = block.attn
        width = attention.embed_dim
        _rank_major_columns(attention.c_attn, [width] * 3, tp)
        attention.split_size = width // tp  # the local q, k and v widths: GPT2Attention splits c_attn's output by it
        parallelize_module(block, mesh, lora_aware(block, {
            "ln_1": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attn.c_attn": colwise(),
            "attn.c_proj": rowwise(output_layouts=Shard(1)),
            "ln_2": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.c_fc": colwise(),
            "mlp.c_proj": rowwise(output_layouts=Shard(1)),
        }))
