"""Issue 13, stages whose layers differ: DeepSeek-V3's dense and MoE layers on one stage under FSDP2 (each layer's group
gathered at its own size), and Gemma's sliding-window and full-attention layers cut per stage (each stage built, and
estimated, with its own layers' kinds). Small widths and four layers; every rank traced and held to the estimator."""

from __future__ import annotations

import copy

import pytest

from memtui.engine.estimator import _stage_shards, estimate
from memtui.engine.estimator.layout import pipeline_stages_model
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.estimator.pipeline import _stage_layer_kinds
from memtui.engine.model.architectures import attention_layer_types, model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace_moe_tp import small_deepseek

TOLERANCE = 1e-3  # measured: within 0.07% (512-byte roundings, the whole batch's labels)

# one dense layer, then three MoE ones: the first stage holds the dense layer and an MoE one
DEEPSEEK = model_spec_from_config({**small_deepseek().config, "num_hidden_layers": 4, "first_k_dense_replace": 1},
                                  model_id="small-deepseek-v3-4", source="test")


def small_gemma(preset: str, layers: int, **overrides):
    """The family's layout at `layers` layers, width 256, a 128-token sliding window."""
    config = copy.deepcopy(resolve_model(preset).hf_config())
    config.update({"num_hidden_layers": layers, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048, "sliding_window": 128, **overrides})
    return model_spec_from_config(config, model_id=f"small-{preset}-{layers}", source="test")


# every third layer full: the first stage's two are sliding-window ones, the second stage's first is full
GEMMA3 = small_gemma("gemma-3-1b", 4, sliding_window_pattern=3)


def _assert_every_rank(config: TrainingConfig, spec) -> None:
    import torch.distributed as dist

    from memtui.engine.trace import trace

    result = trace(config, model=spec)
    assert not dist.is_initialized()
    assert any(line.startswith("pipeline parallel (traced)") for line in result.traced), result.traced
    estimated = estimate(config, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    assert len(result.budget.stages) == len(estimated.stages) == config.pp
    for traced_rank, estimated_rank in zip(result.budget.stages, estimated.stages):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=TOLERANCE), traced_rank.rank


def test_fsdp2_gathers_each_layer_of_a_deepseek_stage_at_its_own_size():
    """The first stage's dense layer holds far fewer parameters than its MoE one: FSDP2 gathers each at its own size,
    and each layer's pre-backward holds its own all-gather buffer beside its copy (sized as the stage's largest
    layer, the first rank was +2.35% with tp 2, +1.6% on Moonlight's full-size row)."""
    config = TrainingConfig(model="deepseek-v3", precision="bf16-mixed", batch_size=4, seq_len=512, microbatches=4,
                            gpus=8, pp=2, tp=2, zero=3, pp_schedule="1f1b")
    shards = _stage_shards(config, DEEPSEEK, (0, 2, True, False), dp=2)
    dense, moe = shards.layer_weights
    assert 0 < dense < 0.6 * moe  # its dense MLP against eight routed experts and a shared one
    assert shards.layers_done(shards.layer_gradients[1]) == 1
    assert shards.layers_done(sum(shards.layer_gradients)) == 2
    _assert_every_rank(config, DEEPSEEK)


def test_gemma_stages_keep_their_own_layer_types():
    """Each stage's layer_types are the whole model's, cut (Gemma-2's and Gemma 3's as their configs make them from
    the whole depth: a stage rebuilt at its own depth would start its pattern again)."""
    config = TrainingConfig(model="gemma-2-9b", batch_size=4, gpus=2, pp=2, microbatches=4)
    gemma2 = small_gemma("gemma-2-9b", 6)
    assert [attention_layer_types(pipeline_stages_model(config, gemma2, [index])) for index in (0, 1)] == [
        ["sliding_attention", "full_attention", "sliding_attention"],
        ["full_attention", "sliding_attention", "full_attention"]]
    from memtui.engine.trace.pipeline import _stage_spec

    assert _stage_spec(gemma2, config, 1).config["layer_types"][0] == "full_attention"
    config = config.model_copy(update={"model": "gemma-3-1b", "seq_len": 256})
    first, second = (_stage_layer_kinds(config, GEMMA3, index, 2) for index in (0, 1))
    assert (first.rope_pairs, first.first_layer_full) == (1, False)  # two sliding-window layers: one (cos, sin) pair
    assert (second.rope_pairs, second.first_layer_full, second.rope_holder) == (2, True, "first")


@pytest.mark.parametrize("spec, preset", [(GEMMA3, "gemma-3-1b"), (small_gemma("gemma-2-9b", 4), "gemma-2-9b")],
                         ids=["gemma3", "gemma2"])
def test_gemma_stages_are_traced_and_estimated_with_their_own_layer_types(spec, preset):
    """Gemma 3: the second stage begins with a full-attention layer (its SDPA gets no mask) and computes a (cos, sin)
    pair per kind; the first has sliding-window layers only and one pair. A later stage's received hidden states are
    not scaled (the scaled word embedding scales in the first stage): +0.37% and +0.32% before. Gemma-2: the last
    stage's logits are softcapped as Gemma2ForCausalLM's forward caps them (the trace's stage skipped it: +1.6%)."""
    config = TrainingConfig(model=preset, precision="bf16-mixed", batch_size=4, seq_len=256, microbatches=4,
                            gpus=2, pp=2, pp_schedule="1f1b")
    _assert_every_rank(config, spec)
