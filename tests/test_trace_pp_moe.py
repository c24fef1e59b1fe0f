"""Issue 13 for the MoE families: Mixtral, gpt-oss and DeepSeek-V3 cut into pipeline stages as torchtitan cuts its MoE
models (the embedding on the first stage, the final norm and head on the last, each layer of its own kind: DeepSeek-V3's
leading dense layers on the first stages), alone, with FSDP2 and with the MoE tensor-parallel plan; every rank traced and
the estimator's peak held to it."""

from __future__ import annotations

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.estimator.layout import pipeline_refusal, pipeline_stages_model
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace_moe_tp import small_deepseek, small_moe

# Measured at these sizes: within 0.06% (tens of KiB: the whole batch's labels, which the estimator counts per
# micro-batch, 512-byte roundings; gpt-oss under the MoE plan +0.05%).
TOLERANCE = 1e-3


def four_layers(spec, **update):
    """The small model at four layers (two per stage), gpt-oss's layer types alternating over them."""
    config = {**spec.config, "num_hidden_layers": 4, **update}
    if "layer_types" in config:
        config["layer_types"] = ["sliding_attention", "full_attention"] * 2
    return model_spec_from_config(config, model_id=f"small-{spec.family}-4", source="test")


MIXTRAL = four_layers(small_moe("mixtral-8x7b"))
GPT_OSS = four_layers(small_moe("gpt-oss-20b"))
# three dense layers of four: the second stage holds one dense layer, then an MoE one
DEEPSEEK = four_layers(small_deepseek(), first_k_dense_replace=3)


def _traced_and_estimated(config: TrainingConfig, spec):
    import torch.distributed as dist

    from memtui.engine.trace import trace

    assert pipeline_refusal(config, spec) is None
    result = trace(config, model=spec)
    assert not dist.is_initialized()
    assert any(line.startswith("pipeline parallel (traced)") for line in result.traced), result.traced
    return result, estimate(config, model=spec)


def _assert_every_rank(result, estimated, config: TrainingConfig, label: str) -> None:
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    assert len(result.budget.stages) == len(estimated.stages) == config.pp
    for traced_rank, estimated_rank in zip(result.budget.stages, estimated.stages):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=TOLERANCE), (label, traced_rank.rank)


@pytest.mark.parametrize("spec, preset, schedule, options", [
    # a later micro-batch's backward peaks as the experts' down_proj gradient is made, before AccumulateGrad adds it
    # in place (the first backward keeps it: -0.87% on the first rank before)
    (MIXTRAL, "mixtral-8x7b", "1f1b", {"seq_len": 1024}),
    # FSDP2 per stage: the MoE block's routing backward runs after the layer's pre-backward gathered it and
    # prefetched the next one (-1.19% on the last rank before)
    (MIXTRAL, "mixtral-8x7b", "1f1b", {"seq_len": 1024, "gpus": 4, "zero": 3}),
    # the MoE plan on each stage: the last stage's final-norm output goes with its forward, before the schedule's loss
    # (+0.46% at the loss before)
    (MIXTRAL, "mixtral-8x7b", "1f1b", {"seq_len": 1024, "gpus": 4, "tp": 2}),
    # and at a short sequence, where the experts' weight gradients decide a later backward's peak: each waits for
    # its to_local view's backward, older than the experts' ops, before AccumulateGrad adds it (-2.8% before)
    (MIXTRAL, "mixtral-8x7b", "1f1b", {"seq_len": 128, "gpus": 4, "tp": 2}),
    (GPT_OSS, "gpt-oss-20b", "gpipe", {"seq_len": 512}),
    # gpt-oss's masks (eager, sliding and full) made for the whole sequence on every stage (it failed before)
    (GPT_OSS, "gpt-oss-20b", "1f1b", {"seq_len": 128, "gpus": 4, "tp": 2}),
], ids=["mixtral-1f1b", "mixtral-fsdp2", "mixtral-tp2", "mixtral-tp2-short", "gpt-oss-gpipe", "gpt-oss-tp2"])
def test_moe_pipeline_stages_are_traced_and_estimated_per_rank(spec, preset, schedule, options):
    config = TrainingConfig(model=preset, precision="bf16-mixed", batch_size=4, microbatches=4, pp=2,
                            pp_schedule=schedule, **{"gpus": 2, **options})
    result, estimated = _traced_and_estimated(config, spec)
    if config.tp > 1:
        assert any("MoE blocks" in line for line in result.traced), result.traced
    _assert_every_rank(result, estimated, config, f"{preset} {options}")


def test_deepseek_v3_stages_keep_their_layers_kinds():
    """Layers 0-1 dense on the first stage; layer 2 dense and layer 3 MoE on the second (built at two layers, whose
    first_k_dense_replace would have made both dense). Each rank's weights are the estimator's, and so is its peak."""
    config = TrainingConfig(model="deepseek-v3", precision="bf16-mixed", batch_size=4, seq_len=512, microbatches=4,
                            gpus=2, pp=2, pp_schedule="1f1b")
    assert [pipeline_stages_model(config, DEEPSEEK, [index]).dense_layers for index in (0, 1)] == [2, 1]
    result, estimated = _traced_and_estimated(config, DEEPSEEK)
    tensors = 2 * 14 + 3
    for traced_rank, estimated_rank in zip(result.budget.stages, estimated.stages):
        assert abs(traced_rank.per_gpu.weights - estimated_rank.per_gpu.weights) <= 512 * tensors
    routed = 8 * 3 * 128 * 256 * 4  # one MoE layer's routed experts, fp32
    assert result.budget.stages[1].per_gpu.weights - result.budget.stages[0].per_gpu.weights > routed / 2
    _assert_every_rank(result, estimated, config, "deepseek-v3")


def test_the_routers_load_balancing_loss_is_refused_under_pipeline_parallelism():
    """output_router_logits sums every layer's router logits into the loss, across the stages: no stack runs it."""
    from tests.refusal import refusal

    spec = four_layers(small_moe("mixtral-8x7b"), output_router_logits=True)
    config = TrainingConfig(model="mixtral-8x7b", batch_size=4, gpus=2, pp=2, microbatches=4)
    reason = refusal(config, spec)
    assert reason is not None and reason.startswith("--pp:") and "output_router_logits" in reason
    assert refusal(config, MIXTRAL) is None and pipeline_refusal(config, MIXTRAL) is None


def test_the_moe_plan_beside_ddp_is_refused_under_pipeline_parallelism():
    """As without stages: the MoE plan with DDP or ZeRO-1 beside it is refused; with FSDP2 it is traced."""
    from tests.refusal import refusal

    config = TrainingConfig(model="mixtral-8x7b", batch_size=4, gpus=8, pp=2, tp=2, zero=0, microbatches=4)
    assert "runs DDP, which torchtitan" in refusal(config, MIXTRAL)
    assert pipeline_refusal(config.model_copy(update={"zero": 3}), MIXTRAL) is None
