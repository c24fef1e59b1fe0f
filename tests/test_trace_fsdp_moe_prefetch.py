"""Issue 13: FSDP2 (ZeRO-3) on MoE models, where the peak falls in a layer's backward with the next layer's all-gather
already prefetched. A layer's pre-backward copies it out of its all-gather buffer, frees the buffer and prefetches
the layer below, before the layer makes any gradient: under LoRA on attention only, the frozen experts' backward
runs with two layers gathered and no gradient yet (the estimator took "no gradient yet" for "before the layers"). And
the layer below is prefetched at its own size: on a DeepSeek-V3 pipeline stage the lowest MoE layer prefetches the
dense first layer, the one above it an MoE layer, so that one can be the stage's peak (Moonlight's first rank)."""

from __future__ import annotations

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace_moe_tp import small_deepseek, small_moe

# Measured at these sizes: Mixtral -0.006% (-0.80% before), DeepSeek-V3's first rank -0.029% at 128 tokens (-0.72%
# without the candidate above the lowest MoE layer).
TOLERANCE = 1e-3


def _trace(config: TrainingConfig, spec):
    import torch.distributed as dist

    from memtui.engine.trace import trace

    result = trace(config, model=spec)
    assert not dist.is_initialized()
    return result


def test_frozen_experts_backward_runs_with_the_next_layer_prefetched():
    """Small Mixtral with LoRA on attention (the experts frozen), tp 2 and ZeRO-3 over dp 2, at a short sequence where
    the gathered experts decide: the trace peaks in the last layer's expert backward, that layer gathered beside the
    one below's all-gather buffer; the estimate's backward holds both."""
    spec = small_moe("mixtral-8x7b", intermediate_size=2048)
    config = TrainingConfig(model="mixtral-8x7b", batch_size=1, seq_len=64, precision="bf16-mixed", lora_rank=8,
                            lora_targets="all-linear", gpus=4, tp=2, zero=3)
    traced = _trace(config, spec)
    estimated = estimate(config, model=spec)
    assert traced.peak_phase == estimated.peak_phase == "backward"
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=TOLERANCE)


def test_a_stage_layer_above_the_lowest_moe_layer_prefetches_an_moe_layer():
    """Small DeepSeek-V3 at ten layers (the first dense) in two stages of five, tp 2 and ZeRO-3 over dp 2: the first
    rank peaks in layer 2's backward of a later micro-batch (layers 4 to 2 gathered, layer 1 prefetched), above the
    lowest MoE layer's moment, which prefetches the small dense layer."""
    spec = model_spec_from_config({**small_deepseek().config, "num_hidden_layers": 10, "moe_intermediate_size": 512},
                                  model_id="small-deepseek-v3-10", source="test")
    config = TrainingConfig(model="deepseek-v3", batch_size=4, seq_len=128, microbatches=4, pp=2, pp_schedule="1f1b",
                            precision="bf16-mixed", gpus=8, tp=2, zero=3)
    traced = _trace(config, spec)
    estimated = estimate(config, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=TOLERANCE), traced_rank.rank
