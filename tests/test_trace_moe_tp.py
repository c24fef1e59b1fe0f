"""Tensor parallelism of Mixtral, Qwen3-MoE, gpt-oss and DeepSeek-V3 traced for one rank (torchtitan's MoE plan
without expert parallelism on the fake process group), and the estimator's sequence-parallel MoE terms held to the
trace."""

from __future__ import annotations

import copy

import pytest

from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig

TRACED = "tensor parallel (traced)"


def small_moe(model: str, **overrides):
    """The family's layout at two layers, width 256 and eight experts (Qwen3-30B-A3B routes each token to all eight
    of them here, as to eight of its 128): the same modules and code paths as the full model, in seconds."""
    config = copy.deepcopy(resolve_model(model).hf_config())
    experts = "num_local_experts" if "num_local_experts" in config else "num_experts"
    config.update({"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048, "pad_token_id": 0, "bos_token_id": 1,
                   "eos_token_id": 2, experts: 8, **overrides})
    if "moe_intermediate_size" in config:
        config["moe_intermediate_size"] = 512
    if "layer_types" in config:  # gpt-oss: a sliding-window layer, then a full-attention one
        config["layer_types"] = config["layer_types"][:2]
    return model_spec_from_config(config, model_id=f"small-{model}", source="test")


def _traced_and_estimated(training: TrainingConfig, spec):
    """(trace, estimate, cuBLAS workspace): the estimator's tensor peak holds the workspace, the trace's does not."""
    import torch.distributed as dist

    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.trace import trace

    traced = trace(training, model=spec)
    assert not dist.is_initialized()  # the fake process group is torn down
    assert any(TRACED in line for line in traced.traced), traced.modelled
    return traced, estimate(training, model=spec), cublas_workspace_bytes(resolve_gpu(training.gpu))


def _phase_peak(traced, phase: str) -> int:
    return max(point["peak_bytes"] for point in traced.phase_peaks if point["step"] == 2 and point["phase"] == phase)


def test_mixtral_tensor_parallel_is_traced_with_sharded_experts_as_estimated():
    """tp 2: every expert holds half its intermediate rows and columns (the router whole), the block's input is
    all-gathered and its partial output reduce-scattered. The trace says so, the rank's states are the estimator's
    (to the allocator's rounding) and so are the step's peak and the loss's (measured: within 0.02%)."""
    from memtui.engine.trace import trace

    spec = small_moe("mixtral-8x7b")
    training = TrainingConfig(model="mixtral-8x7b", batch_size=2, seq_len=1024, precision="bf16-true", gpus=2, tp=2)
    traced, estimated, workspace = _traced_and_estimated(training, spec)
    assert any("MoE blocks" in line and "router replicated" in line for line in traced.traced)
    single = trace(training.model_copy(update={"gpus": 1, "tp": 1}), model=spec)
    experts = 2 * 8 * 3 * 512 * 256 * 2  # two layers of eight experts' gate, up and down, bf16
    assert single.budget.model_states.weights - traced.budget.model_states.weights > experts / 2
    tensors = 2 * 10 + 3
    for field in ("weights", "gradients", "optimizer_states"):
        assert abs(getattr(traced.budget.model_states, field) - getattr(estimated.model_states, field)) <= 512 * tensors
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=3e-4)
    estimated_loss = next(point.bytes for point in estimated.timeline if point.phase == "loss") - workspace
    assert estimated_loss == pytest.approx(_phase_peak(traced, "loss"), rel=3e-4)


def test_qwen3_moe_recomputed_blocks_under_tensor_parallelism_are_estimated_as_traced():
    """Full checkpointing at tp 2: the backward re-runs each layer with its block's all-gather, and the recompute
    ends at the last saved tensor, the restoring gather's indices, before the gathered rows are made (the replay
    made them: +1.4% before at this size, one routed tensor too many at the backward's peak)."""
    spec = small_moe("qwen3-30b-a3b")
    training = TrainingConfig(model="qwen3-30b-a3b", batch_size=2, seq_len=1024, precision="bf16-mixed", gpus=2, tp=2,
                              checkpointing="full")
    traced, estimated, workspace = _traced_and_estimated(training, spec)
    assert traced.peak_phase == "backward"
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=1e-3)


def test_moe_tensor_parallel_with_fsdp2_over_dp_is_traced_on_a_2d_mesh():
    """FSDP2 shards the TP-sharded experts further over dp (torchtitan's dp x tp), as the estimator's rank holds."""
    spec = small_moe("mixtral-8x7b")
    training = TrainingConfig(model="mixtral-8x7b", batch_size=2, seq_len=1024, precision="bf16-mixed", gpus=4, tp=2,
                              zero=3)
    traced, estimated, workspace = _traced_and_estimated(training, spec)
    assert any("FSDP2" in line and "(dp, tp) mesh" in line for line in traced.traced), traced.traced
    assert abs(traced.budget.model_states.optimizer_states - estimated.model_states.optimizer_states) <= 2048 * 23
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=5e-4)


def test_gpt_oss_tensor_parallel_shards_its_biased_experts_and_sinks_as_estimated():
    """gpt-oss at tp 2: the experts' interleaved gate/up columns and their bias sharded, the down projection's bias
    and the router's replicated, the attention sinks sharded with the heads, the masks made for the whole sequence
    (gpt-oss hands its mask factories no positions). The states are the estimator's (the row-parallel biases whole
    on every rank, 9 KiB under before) and so is the peak, at the forward's end (measured: -0.007%)."""
    spec = small_moe("gpt-oss-20b")
    training = TrainingConfig(model="gpt-oss-20b", batch_size=2, seq_len=1024, precision="bf16-mixed", gpus=2, tp=2)
    traced, estimated, workspace = _traced_and_estimated(training, spec)
    tensors = 2 * 15 + 3
    for field in ("weights", "gradients", "optimizer_states"):
        assert abs(getattr(traced.budget.model_states, field) - getattr(estimated.model_states, field)) <= 512 * tensors
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=2e-4)


def small_deepseek():
    """DeepSeek-V3's layout at two layers (one dense, one MoE with a shared expert), width 256, four heads, the
    low-rank query, eight routed experts in two groups."""
    config = copy.deepcopy(resolve_model("deepseek-v3").hf_config())
    config.update(num_hidden_layers=2, first_k_dense_replace=1, hidden_size=256, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, head_dim=16, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8,
                  n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=1, vocab_size=2048,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return model_spec_from_config(config, model_id="small-deepseek-v3", source="test")


@pytest.mark.parametrize("options", [{}, {"gpus": 4, "zero": 3, "seq_len": 1024}], ids=["tp2", "tp2-fsdp2"])
def test_deepseek_v3_latent_attention_and_shared_experts_under_tensor_parallelism_are_estimated_as_traced(options):
    """DeepSeek-V3 as torchtitan's plan: the low-rank query and compressed key/value projections and their norms
    replicated, q_b_proj and kv_b_proj Colwise on the heads, the dense MLP the Llama plan's, the shared experts'
    partial output summed with the routed experts' before the block's one reduce-scatter. The replicated
    projections are whole in the estimator's states (half before), and the peak is the trace's (measured:
    -0.04%, and -0.04% with FSDP2 over 2)."""
    training = TrainingConfig(model="deepseek-v3", batch_size=2, precision="bf16-mixed", tp=2,
                              **{"gpus": 2, "seq_len": 512, **options})
    traced, estimated, workspace = _traced_and_estimated(training, small_deepseek())
    assert any("latent attention" in line for line in traced.traced)
    assert any("shared experts" in line for line in traced.traced)
    tensors = 2 * 12 + 3
    for field in ("weights", "gradients", "optimizer_states"):
        assert abs(getattr(traced.budget.model_states, field) - getattr(estimated.model_states, field)) <= 512 * tensors
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=6e-4)


def test_experts_gate_up_rows_are_reordered_rank_major():
    """The stacked [gate; up] rows of every expert become [gate_0 up_0 | gate_1 up_1], so that Shard(1)'s block r
    is rank r's share of both, which transformers' experts split with chunk(2)."""
    import torch

    from memtui.engine.trace.moe_parallel import _reorder_rank_major

    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(torch.arange(8.0).view(1, 8, 1).repeat(2, 1, 3))
    _reorder_rank_major(experts, "gate_up_proj", dim=1, parts=[4, 4], tp=2)
    assert experts.gate_up_proj[1, :, 2].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert experts.gate_up_proj.requires_grad


def test_moe_tensor_parallel_outside_the_plan_is_refused_naming_tp():
    from memtui.engine.estimator.layout import tensor_parallel_refusal
    from tests.refusal import refusal

    training = TrainingConfig(model="mixtral-8x7b", batch_size=1, seq_len=64, gpus=2, tp=2)
    odd = small_moe("mixtral-8x7b", intermediate_size=501)
    assert refusal(training, odd).startswith("--tp: 2 does not divide the experts' intermediate size 501")
    assert refusal(training, small_moe("mixtral-8x7b")) is None
    assert tensor_parallel_refusal(training, small_moe("mixtral-8x7b")) is None


def test_moe_plan_beside_ddp_is_refused_naming_zero():
    """torchtitan, whose MoE plan this is, refuses DDP beside tensor parallelism (and DDP on the parameters
    _pre_dp_module_transform makes local does not take the plan's expert weights): refused in one line naming
    --zero; with FSDP2 it is traced."""
    from memtui.engine.estimator.layout import tensor_parallel_refusal
    from tests.refusal import refusal

    spec = small_moe("mixtral-8x7b")
    for zero in (0, 1):
        reason = refusal(TrainingConfig(model="mixtral-8x7b", gpus=4, tp=2, zero=zero), spec)
        assert reason is not None and reason.startswith(f"--zero: {zero} runs DDP, which torchtitan"), reason
    assert refusal(TrainingConfig(model="mixtral-8x7b", gpus=4, tp=2, zero=3), spec) is None
    assert tensor_parallel_refusal(TrainingConfig(model="mixtral-8x7b", gpus=4, tp=2, zero=3), spec) is None
