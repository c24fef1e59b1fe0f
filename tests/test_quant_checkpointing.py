"""Quantized bases and checkpointing policies: the build does what transformers, bitsandbytes and torchtitan do,
and the estimate follows the trace."""

from __future__ import annotations

import pytest

from memtui.engine.model.specs import TrainingConfig
from tests.test_trace import assert_estimate_matches_trace

GPT2_QLORA = dict(model="gpt2", quant="nf4", precision="bf16-mixed", lora_rank=8, lora_targets="c_attn", seq_len=128)


def test_gpt2_quantized_estimate_matches_trace():
    """GPT-2's nf4 base under autocast: once 31% apart (the estimate counted fp32 unquantized weights)."""
    assert_estimate_matches_trace(GPT2_QLORA, 0.002)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_the_build_quantizes_gpt2s_conv1d_layers_and_keeps_the_rest_in_the_compute_dtype(quant):
    """transformers' replace_with_bnb_linear converts Conv1D as well as nn.Linear; the unquantized weights are
    in from_pretrained's dtype, which memtui takes to be the compute dtype."""
    import torch

    from memtui.engine.model.presets import resolve_model
    from memtui.engine.torchside.build import build_model
    from memtui.engine.torchside.replicas import Int8LinearReplica, Nf4LinearReplica

    with torch.device("meta"):
        model = build_model(resolve_model("gpt2"), TrainingConfig(**dict(GPT2_QLORA, quant=quant)),
                            device="meta", quant_backend="replica")
    replica = Nf4LinearReplica if quant == "nf4" else Int8LinearReplica
    block = model.base_model.model.transformer.h[0]
    layers = [block.attn.c_attn.base_layer, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    assert all(isinstance(layer, replica) for layer in layers)
    assert (layers[0].in_features, layers[0].out_features) == (768, 2304)
    unquantized = {p.dtype for name, p in model.named_parameters() if "lora_" not in name and p.dtype.is_floating_point}
    assert unquantized == {torch.bfloat16}
