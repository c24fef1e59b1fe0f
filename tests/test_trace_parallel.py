"""Data parallelism traced for one rank at the real world size (torch's fake process group), not modelled."""

from __future__ import annotations

import copy
import functools
import json

import pytest

from memtui.cli import main
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig

WORLD = 4
MODELLED_SHARDING = "parallel sharding: estimator"


def tiny_llama(layers: int = 2):
    """Llama-3 with every dimension shrunk (as tests/test_trace.py): the same code paths in milliseconds."""
    config = copy.deepcopy(resolve_model("llama-3.2-1b").hf_config())
    config.update(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_hidden_layers=layers, vocab_size=512, tie_word_embeddings=True)
    return model_spec_from_config(config, model_id="tiny-llama", source="test")


SPEC = tiny_llama()
TENSORS = 2 * 9 + 2  # parameter tensors of the tiny model: 9 per layer, the (tied) embedding and the final norm


def config(**options) -> TrainingConfig:
    return TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=32, precision="bf16-mixed", **options)


@pytest.fixture(scope="module")
def single():
    from memtui.engine.trace import trace

    return trace(config(), model=SPEC)


@functools.cache  # one trace per ZeRO stage in each test process: several tests read the same one
def _trace(zero: int):
    import torch.distributed as dist

    from memtui.engine.trace import trace

    result = trace(config(gpus=WORLD, zero=zero), model=SPEC)
    assert not dist.is_initialized()  # torn down: the next trace in this process starts its own group
    assert not any(MODELLED_SHARDING in line for line in result.modelled), result.modelled
    return result


def test_ddp_traces_its_gradient_buckets(single):
    result = _trace(0)
    assert any(line.startswith(f"DDP at world size {WORLD}") for line in result.traced)
    states, unsharded = result.budget.model_states, single.budget.model_states
    assert states == unsharded  # DDP replicates everything
    # The reducer's flat buckets hold every gradient (rounded per bucket, not per tensor) for the whole step.
    buckets = result.budget.per_gpu.temporary - single.budget.per_gpu.temporary
    assert abs(buckets - unsharded.gradients) <= 512 * TENSORS
    assert result.traced_tensor_peak_bytes - single.traced_tensor_peak_bytes == buckets


def test_zero1_keeps_rank_0s_share_of_the_optimizer_states(single):
    result = _trace(1)
    assert any("ZeroRedundancyOptimizer" in line for line in result.traced)
    states, unsharded = result.budget.model_states, single.budget.model_states
    assert (states.weights, states.gradients) == (unsharded.weights, unsharded.gradients)
    # Whole tensors, dealt out largest first: rank 0 holds at least its 1/WORLD and at most one tensor more.
    assert unsharded.optimizer_states / WORLD <= states.optimizer_states < unsharded.optimizer_states / 2


@pytest.mark.parametrize("zero", [2, 3])
def test_fsdp2_shards_weights_gradients_and_states(single, zero):
    result = _trace(zero)
    assert any(line.startswith(f"FSDP2 fully_shard") and f"reshard_after_forward={zero == 3}" in line
               for line in result.traced)
    states, unsharded = result.budget.model_states, single.budget.model_states
    # Each rank keeps 1/WORLD of every tensor, its first dimension padded to a multiple of WORLD, each shard
    # rounded to the allocator's 512-byte blocks.
    assert unsharded.weights / WORLD <= states.weights <= unsharded.weights / WORLD + 1024 * TENSORS
    assert unsharded.gradients / WORLD <= states.gradients <= unsharded.gradients / WORLD + 1024 * TENSORS
    assert unsharded.optimizer_states / WORLD <= states.optimizer_states <= unsharded.optimizer_states / WORLD + 2048 * TENSORS
    assert result.traced_tensor_peak_bytes < single.traced_tensor_peak_bytes
    # Gathered layers are weights at the peak, beside this rank's shards.
    assert result.budget.per_gpu.weights > states.weights


def test_zero3_reshards_after_forward_so_its_peak_is_below_zero2():
    assert _trace(3).traced_tensor_peak_bytes < _trace(2).traced_tensor_peak_bytes


def test_trace_cli_reports_fsdp2_as_traced(tmp_path, capsys):
    # GPT-2 at 2 of its 12 layers, as a config.json: GPT-2 is traced at every layer, and the report is the same.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**resolve_model("gpt2").hf_config(), "n_layer": 2}))
    code = main(["trace", "--model", str(path), "--batch-size", "1", "--seq-len", "64", "--gpus", "8", "--zero", "3",
                 "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(data["per_gpu"]) == {"weights", "gradients", "optimizer_states", "activations", "temporary", "overhead"}
    assert any("FSDP2" in line and "world size 8" in line for line in data["traced"])
    assert not any(MODELLED_SHARDING in line for line in data["modelled"])
    assert data["allocator"] is not None  # the rank's own allocation sequence, replayed
    params = resolve_model(str(path)).params
    assert params < resolve_model("gpt2").params * 0.75  # the 2-layer model, not GPT-2's own
    assert data["model_states"]["weights"] < params * 4 / 8 * 1.01


def test_trace_equals_two_real_gloo_ranks_byte_for_byte(tmp_path, monkeypatch):
    """The check of the trace itself: `memtui run --gpus 2` runs two real gloo processes of the same FSDP2
    program on real CPU tensors, measured by the same tracker; rank 0's peak is the traced one, to the byte."""
    import subprocess
    import sys
    from pathlib import Path

    from memtui.engine.live.devices import cpu_device
    from memtui.engine.live.plan import LiveOptions, make_plan
    from memtui.engine.trace import trace

    monkeypatch.setenv("MEMTUI_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("MEMTUI_NO_NVML", "1")
    scaled = dict(device="cpu", layers=2, width=256, vocab=2048, seq_len=128, steps=2)
    run = subprocess.run([sys.executable, "-m", "memtui", "run", "--model", "llama-3.2-1b", "--gpus", "2", "--zero", "3",
                          *[f"--{key.replace('_', '-')}={value}" for key, value in scaled.items()], "--json"],
                         capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.splitlines()[-1])
    assert summary["result"] == "completed" and summary["scaled_model"]["ranks"] == 2
    live = summary["measured"]
    # As predicted (the live check's own comparison), with rank 0 holding half the optimizer states.
    predicted = summary["predicted"]["tensor_peak_bytes"]
    assert abs(predicted - live["tensor_peak_bytes"]) <= 0.05 * live["tensor_peak_bytes"], summary["error_pct"]
    plan = make_plan(TrainingConfig(model="llama-3.2-1b", gpus=2, zero=3), LiveOptions(**scaled), cpu_device())
    single = make_plan(TrainingConfig(model="llama-3.2-1b", zero=3), LiveOptions(**scaled), cpu_device())
    assert live["components"]["optimizer_states"] == pytest.approx(
        single.predicted_components["optimizer_states"] / 2, rel=0.01)
    traced = trace(plan.config, model=plan.spec)
    assert traced.traced_tensor_peak_bytes == live["tensor_peak_bytes"]
    assert traced.budget.model_states.optimizer_states == live["components"]["optimizer_states"]


def test_zero_redundancy_partition_is_greedy_largest_first():
    from memtui.engine.estimator.layout import zero_redundancy_largest_share

    # torch's _partition_parameters: 10 -> rank 0, 6 -> rank 1, 5 -> rank 1 (11), 4 -> rank 0 (14).
    assert zero_redundancy_largest_share([4, 10, 5, 6], 2) == 14
    assert zero_redundancy_largest_share([100, 1, 1, 1], 4) == 100  # a tensor is never split


def test_zero1_estimate_follows_zero_redundancy_optimizers_partition_as_traced():
    """At 8 ranks rank 0 holds Qwen's 136M-element embedding's Adam states, not 1/8 of all: the estimate
    follows ZeroRedundancyOptimizer's whole-tensor partition and equals the trace. Qwen2.5-0.5B at 4 of its 24
    layers: rank 0's share is the embedding alone at either depth (the other ranks' shares of the layers stay below
    it), and the trace of all 24 took ~20 s (DDP's buckets defeat the few-layer extension)."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.trace import trace

    hf = copy.deepcopy(resolve_model("qwen2.5-0.5b").hf_config())
    hf.update(num_hidden_layers=4)
    spec = model_spec_from_config(hf, model_id="qwen2.5-0.5b-4-layers", source="test")
    qwen = TrainingConfig(model="qwen2.5-0.5b", seq_len=128, gpus=8, zero=1)
    traced = trace(qwen, model=spec)
    estimated = estimate(qwen, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(qwen.gpu))
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=0.002)
    # 1/8 of the states would be far less than what rank 0 holds: the embedding's.
    embedding = spec.vocab_size * spec.hidden_size * 4 * 2  # fp32 Adam moments
    assert estimated.per_gpu.optimizer_states == traced.budget.model_states.optimizer_states == embedding
    assert estimated.per_gpu.optimizer_states > 2 * estimate(qwen.model_copy(update={"zero": 0}),
                                                             model=spec).per_gpu.optimizer_states // 8


# ---- HSDP: --shard-group G (issue 13) -------------------------------------------------------------------------


@pytest.mark.parametrize("zero", [2, 3])
def test_hsdp_shards_within_its_group_as_fsdp2_over_that_many_ranks(zero):
    """HSDP at 4 ranks in shard groups of 2 runs FSDP2 on a 2-D mesh (2 replicas x 2 shards): every rank holds
    1/2 of each tensor and the replicas' all-reduce runs in place on the reduce-scatter output (which backs the
    sharded gradients), so rank 0's step is FSDP2's at world size 2, byte for byte; the estimate follows."""
    from memtui.engine.estimator import estimate
    from memtui.engine.trace import trace

    hybrid = _trace_config(config(gpus=4, zero=zero, shard_group=2))
    assert any("HSDP" in line and "2 replicas x 2 shards" in line for line in hybrid.traced), hybrid.traced
    flat = trace(config(gpus=2, zero=zero), model=SPEC)
    assert hybrid.traced_tensor_peak_bytes == flat.traced_tensor_peak_bytes
    assert hybrid.budget.model_states == flat.budget.model_states
    whole = _trace(zero)  # sharding over all WORLD = 4 ranks holds less
    assert whole.budget.model_states.optimizer_states < hybrid.budget.model_states.optimizer_states
    assert (estimate(config(gpus=4, zero=zero, shard_group=2), model=SPEC).tensor_peak_bytes
            == estimate(config(gpus=2, zero=zero), model=SPEC).tensor_peak_bytes)


def _trace_config(training: TrainingConfig):
    import torch.distributed as dist

    from memtui.engine.trace import trace

    result = trace(training, model=SPEC)
    assert not dist.is_initialized()
    assert not any(MODELLED_SHARDING in line for line in result.modelled), result.modelled
    return result


def test_hsdp_estimate_equals_the_trace_at_full_size():
    """Llama-3.2-1B at 8 GPUs in shard groups of 4: the states are sharded over 4, not 8."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.trace import trace

    hybrid = TrainingConfig(model="llama-3.2-1b", seq_len=1024, gpus=8, zero=3, shard_group=4)
    traced = trace(hybrid)
    estimated = estimate(hybrid)
    workspace = cublas_workspace_bytes(resolve_gpu(hybrid.gpu))
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=0.005)
    sharded_over_all = estimate(hybrid.model_copy(update={"shard_group": 0}))
    assert estimated.model_states.optimizer_states == pytest.approx(2 * sharded_over_all.model_states.optimizer_states,
                                                                    rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "8", "--zero", "1", "--shard-group", "4"], "memtui: error: --shard-group: HSDP shards through FSDP2"),
    (["--gpus", "8", "--zero", "3", "--shard-group", "3"],
     "memtui: error: --shard-group: 3 does not split the 8 data-parallel ranks into shard groups of 2 or more "
     "(allowed: 0, 2, 4, 8)"),
    (["--gpus", "8", "--tp", "2", "--zero", "3", "--shard-group", "8"],
     "memtui: error: --shard-group: 8 does not split the 4 data-parallel ranks"),
])
def test_shard_group_refusals_name_the_flag(capsys, argv, message):
    code = main(["estimate", "--model", "llama-3.2-1b", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1


# ---- tensor parallelism with sequence parallelism (issue 13) ------------------------------------------------


def tiny_untied_llama():
    """The tiny Llama with its own head: torchtitan's plan shards the embedding and the head separately."""
    spec = tiny_llama()
    hf = copy.deepcopy(spec.hf_config())
    hf["tie_word_embeddings"] = False
    return model_spec_from_config(hf, model_id="tiny-llama-untied", source="test")


UNTIED = tiny_untied_llama()


def _tp_trace(**options):
    import torch.distributed as dist

    from memtui.engine.trace import trace

    result = trace(config(**options), model=UNTIED)
    assert not dist.is_initialized()
    assert not any(MODELLED_SHARDING in line for line in result.modelled), result.modelled
    return result


def test_tensor_parallel_is_traced_and_its_states_are_the_estimators():
    """tp 2 runs DTensor's parallelize_module with torchtitan's Llama plan (sequence parallel, loss parallel) on the
    fake process group: every sharded weight is half, and the embedding's gradient covers the whole vocabulary
    (DTensor's RowwiseParallel embedding backward), as the estimator now holds."""
    from memtui.engine.estimator import estimate
    from memtui.engine.trace import trace

    result = _tp_trace(gpus=2, tp=2)
    assert any("tensor parallel (traced)" in line and "tp 2" in line for line in result.traced), result.traced
    single = trace(config(), model=UNTIED)
    assert result.budget.model_states.weights < 0.55 * single.budget.model_states.weights
    estimated = estimate(config(gpus=2, tp=2), model=UNTIED).model_states
    traced = result.budget.model_states
    tensors = 2 * 9 + 3
    assert abs(traced.weights - estimated.weights) <= 512 * tensors
    assert abs(traced.optimizer_states - estimated.optimizer_states) <= 2 * 512 * tensors
    assert abs(traced.gradients - estimated.gradients) <= 512 * tensors
    vocab_extra = (UNTIED.vocab_size // 2) * UNTIED.hidden_size * 4
    assert traced.gradients - vocab_extra > 0.45 * single.budget.model_states.gradients  # the rest is sharded


def test_tensor_parallel_with_fsdp2_over_dp_is_traced_on_a_2d_mesh():
    result = _tp_trace(gpus=4, tp=2, zero=3)
    assert any("tensor parallel (traced)" in line for line in result.traced)
    assert any("FSDP2" in line and "(dp, tp) mesh" in line for line in result.traced), result.traced
    from memtui.engine.estimator import estimate

    estimated = estimate(config(gpus=4, tp=2, zero=3), model=UNTIED).model_states
    # FSDP2 reduce-scatters the embedding's gradient: nothing of the whole vocabulary stays.
    assert abs(result.budget.model_states.gradients - estimated.gradients) <= 1024 * (2 * 9 + 3)


def test_tied_embeddings_under_tensor_parallel_are_traced_and_keep_one_sharded_gradient(single):
    """A tied head and embedding are one Shard(0) DTensor again after the plan: the embedding's whole-vocabulary
    gradient is added into the head's 1/tp one, so the step keeps the rank's share only (the untied plan keeps
    the whole vocabulary's), and the estimate's tensor peak is the trace's."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.model.presets import resolve_gpu
    from memtui.engine.trace import trace

    result = trace(config(gpus=2, tp=2), model=SPEC)
    assert any("tensor parallel (traced)" in line for line in result.traced), result.traced
    traced, budget = result.budget.model_states, estimate(config(gpus=2, tp=2), model=SPEC)
    tensors = 2 * 9 + 2
    assert abs(traced.gradients - budget.model_states.gradients) <= 512 * tensors
    assert traced.gradients < 0.55 * single.budget.model_states.gradients  # no whole-vocabulary gradient kept
    workspace = cublas_workspace_bytes(resolve_gpu(config().gpu))
    assert abs(budget.tensor_peak_bytes - workspace - result.traced_tensor_peak_bytes) <= 512 * tensors


def _peaks_agree(training: TrainingConfig, spec) -> tuple[int, int]:
    """(traced, estimated) tensor peaks of the step, the estimator's cuBLAS workspace taken off its figure."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.model.presets import resolve_gpu
    from memtui.engine.trace import trace

    result = trace(training, model=spec)
    assert training.tp == 1 or any("tensor parallel (traced)" in line for line in result.traced), result.modelled
    workspace = cublas_workspace_bytes(resolve_gpu(training.gpu))
    return result.traced_tensor_peak_bytes, estimate(training, model=spec).tensor_peak_bytes - workspace


def test_eager_attention_under_sequence_parallel_gets_the_whole_sequences_mask():
    """transformers sizes the causal mask by the embeddings it is handed, 1/tp of the tokens under sequence
    parallelism: the trace makes it for the whole sequence (the step failed on a (s/tp)^2 mask before), and puts
    transformers' mask factory back afterwards."""
    import transformers.masking_utils
    import transformers.models.llama.modeling_llama as modeling_llama

    traced, estimated = _peaks_agree(config(gpus=2, tp=2, attention="eager"), UNTIED)
    assert abs(estimated - traced) <= 512 * 32
    assert modeling_llama.create_causal_mask is transformers.masking_utils.create_causal_mask


def short_gemma3():
    """Gemma-3-4B's layers, six of them (the sixth a full-attention one, as gemma-3-12b's last), a small
    vocabulary: tied embeddings, sandwich norms, per-head q/k norms, and a sliding-window mask at 2048 tokens."""
    config = copy.deepcopy(resolve_model("gemma-3-4b").hf_config())
    config.update(num_hidden_layers=6, vocab_size=8192)
    return model_spec_from_config(config, model_id="short-gemma3", source="test")


@pytest.mark.parametrize("gpus", [1, 2])
def test_gemma3_is_traced_under_tensor_parallelism_as_estimated(gpus):
    """Gemma's post-attention and post-MLP norms run on the rank's 1/tp of the tokens (their output joins the
    residual as a local tensor), its scaled embedding is reduce-scattered, and its sliding-window mask covers the
    whole sequence. A last layer of full attention is replayed as one (8 MiB over at this size before)."""
    training = TrainingConfig(model="gemma-3-4b", batch_size=1, seq_len=2048, precision="bf16-true", gpus=gpus,
                              tp=gpus)
    traced, estimated = _peaks_agree(training, short_gemma3())
    assert abs(estimated - traced) <= 8192


def small_phi3():
    """Phi-3-mini's layout (fused qkv_proj and gate_up_proj, no GQA) shrunk: two layers, width 256, 4 heads."""
    config = copy.deepcopy(resolve_model("phi-3-mini").hf_config())
    config.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return model_spec_from_config(config, model_id="small-phi3", source="test")


def test_fused_rows_are_reordered_rank_major():
    """Each rank's contiguous block of a fused weight is its own share of every part: [q; k; v] with 4, 2 and 2
    rows at tp 2 becomes [q0 q1 k0 v0 | q2 q3 k1 v1], so ColwiseParallel's Shard(0) gives rank r its heads."""
    import torch

    from memtui.engine.trace.tensor_parallel import _reorder_rows

    linear = torch.nn.Linear(1, 8)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(8.0).unsqueeze(1))
        linear.bias.copy_(torch.arange(8.0))
    _reorder_rows(linear, [4, 2, 2], tp=2)
    assert linear.weight.squeeze(1).tolist() == [0, 1, 4, 6, 2, 3, 5, 7] == linear.bias.tolist()
    assert linear.weight.requires_grad


def test_phi3_is_traced_under_tensor_parallelism_as_estimated():
    """Phi-3's fused projections, each rank holding its own q/k/v heads and gate/up share (the attention slicing its
    local qkv output by its local head counts), the MLP's output reduce-scattered like down_proj's in Llama's
    plan: the estimate's peak (the loss, activations alive) is the trace's (measured: within 10 KiB; one sequence,
    whose SDPA output, laid out like the cat's head-major q, is copied by transpose(1, 2).contiguous())."""
    training = TrainingConfig(model="phi-3-mini", batch_size=1, seq_len=512, gpus=2, tp=2)
    traced, estimated = _peaks_agree(training, small_phi3())
    assert estimated == pytest.approx(traced, rel=3e-4)


def test_olmo2_is_traced_under_tensor_parallelism_with_its_whole_width_norms_on_the_sequence():
    """OLMo 2's q_norm and k_norm cover every head: as OLMo-core's plan, the projections' outputs are redistributed
    onto the sequence (DTensor's all-to-all, the op NCCL runs, not gloo's all-gather fallback), normalised whole-width
    and redistributed back; the post-norms run on the rank's 1/tp of the tokens. The estimate's step peak and its
    backward's are the trace's (before: -20%, no sequence parallelism in the replay of OLMo 2)."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.trace import trace

    spec = copy.deepcopy(resolve_model("olmo-2-7b").hf_config())
    spec.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    spec = model_spec_from_config(spec, model_id="small-olmo2", source="test")
    training = TrainingConfig(model="olmo-2-7b", batch_size=2, seq_len=512, gpus=2, tp=2)
    traced, estimated = trace(training, model=spec), estimate(training, model=spec)
    assert any("tensor parallel (traced)" in line for line in traced.traced), traced.modelled
    workspace = cublas_workspace_bytes(resolve_gpu(training.gpu))
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=3e-4)
    traced_backward = max(p["peak_bytes"] for p in traced.phase_peaks if p["step"] == 2 and p["phase"] == "backward")
    estimated_backward = max(p.bytes for p in estimated.timeline if p.phase == "backward") - workspace
    assert estimated_backward == pytest.approx(traced_backward, rel=3e-4)


def test_quantized_weights_beside_tensor_parallelism_are_refused_naming_the_field():
    """No stack runs QLoRA under tensor parallelism: the trace refuses it (it was modelled on a single-GPU trace)."""
    from memtui.engine.errors import InputError
    from memtui.engine.trace import trace

    with pytest.raises(InputError, match="no stack runs quantized weights under tensor parallelism") as refused:
        trace(config(gpus=2, tp=2, lora_rank=4, quant="nf4"), model=UNTIED)
    assert refused.value.fields[:2] == ("quant", "tp")


def test_sequence_parallel_activations_are_estimated_as_traced():
    """Sequence parallel: each rank's norms and residuals hold 1/tp of the tokens, every attention and MLP input is
    all-gathered and every o_proj/down_proj output reduce-scattered, and the loss-parallel cross-entropy makes one
    vocabulary-sharded gradient of the logits. The estimate's forward/backward peak follows the trace (before:
    +13% at this size, the whole sequence's activations in every norm and a log-softmax gradient of its own)."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes

    from memtui.engine.trace import trace

    training = config(gpus=2, tp=2).model_copy(update={"seq_len": 512})

    traced = trace(training, model=UNTIED)
    estimated = estimate(training, model=UNTIED)
    workspace = cublas_workspace_bytes(resolve_gpu(training.gpu))
    activation_phases = ("forward", "loss", "backward")
    traced_peak = max(p["peak_bytes"] for p in traced.phase_peaks if p["step"] == 2 and p["phase"] in activation_phases)
    estimated_peak = max(p.bytes for p in estimated.timeline if p.phase in activation_phases) - workspace
    assert estimated_peak == pytest.approx(traced_peak, rel=0.005)


def test_trace_cli_says_tensor_parallel_is_traced(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(UNTIED.hf_config()))
    code = main(["trace", "--model", str(path), "--batch-size", "1", "--seq-len", "32", "--gpus", "2", "--tp", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "tensor parallel (traced)" in out and "sequence parallel" in out
    assert "modelled, not traced" not in out


def test_fsdp2_root_group_over_tensor_parallel_is_estimated_as_traced():
    """FSDP2 over dp on a (dp, tp) mesh, with a vocabulary large enough that the root group (embedding, final norm,
    head) dominates: its all-gather buffer beside the gathered root at backward's start, the head's gradient held
    whole until the root's reduce-scatter at backward's end, and the embedding's backward making the whole
    vocabulary's gradient before this rank's slice is cloned out of it. Before: -2.9% (the loss's peak; the
    trace's is in backward), as Llama-3.1-8B at 4 GPUs, tp 2, ZeRO-3 was -1.39%."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.trace import trace

    hf = copy.deepcopy(UNTIED.hf_config())
    hf.update(hidden_size=128, intermediate_size=352, head_dim=32, num_hidden_layers=4, vocab_size=8192)
    spec = model_spec_from_config(hf, model_id="tiny-llama-untied-vocab", source="test")
    training = TrainingConfig(model="llama-3.2-1b", batch_size=1, seq_len=128, precision="bf16-mixed", gpus=4, tp=2,
                              zero=3)
    traced = trace(training, model=spec)
    assert any("(dp, tp) mesh" in line for line in traced.traced), traced.traced
    estimated = estimate(training, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(training.gpu))
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=0.002)
    assert estimated.peak_phase == traced.peak_phase == "backward"


def tiny_qwen(family: str):
    """Qwen2.5-7B shrunk (q/k/v biases), or the same as Qwen3 (no biases, q_norm and k_norm over each head)."""
    hf = copy.deepcopy(resolve_model("qwen2.5-7b").hf_config())
    hf.update(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=4096, tie_word_embeddings=False)
    if family == "qwen3":
        hf.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32, attention_bias=False)
    return model_spec_from_config(hf, model_id=f"tiny-{family}", source="test")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tensor_parallel_for_qwen_is_traced_and_estimated_as_traced(family):
    """Qwen2's biases are sharded with their projections; Qwen3's q_norm and k_norm run sequence-parallel over the
    heads (torchtitan's Qwen3 plan), their weights replicated DTensors (before: the optimizer's foreach step failed
    on plain q/k norm weights beside DTensors)."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.trace import trace

    spec = tiny_qwen(family)
    assert spec.family == family and spec.qk_norm == (family == "qwen3")
    training = TrainingConfig(model="llama-3.2-1b", batch_size=1, seq_len=128, precision="bf16-mixed", gpus=2, tp=2)
    traced = trace(training, model=spec)
    assert any("tensor parallel (traced)" in line for line in traced.traced), traced.traced
    estimated = estimate(training, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(training.gpu))
    assert estimated.tensor_peak_bytes - workspace == pytest.approx(traced.traced_tensor_peak_bytes, rel=0.002)
    # Not forward: the trace marks the loss phase after the log-softmax, the estimate at the head.
    for phase in ("loss", "backward"):
        traced_peak = max(p["peak_bytes"] for p in traced.phase_peaks if p["step"] == 2 and p["phase"] == phase)
        estimated_peak = next(p.bytes for p in estimated.timeline if p.phase == phase) - workspace
        assert estimated_peak == pytest.approx(traced_peak, rel=0.002), phase


def test_tensor_parallelism_not_dividing_the_key_value_heads_is_refused():
    """The plan splits the key/value projections by whole heads (Megatron-core divides its query groups by tp):
    tp 4 over 2 key/value heads, which was modelled on a single-GPU trace, is refused, naming tp and what divides."""
    from memtui.engine.errors import InputError
    from memtui.engine.estimator import estimate
    from tests.test_pipeline import small_llama

    spec = small_llama(layers=4, vocab=65536)
    assert spec.num_kv_heads == 2 and spec.num_heads % 4 == 0
    training = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=64, gpus=16, tp=4, pp=2, zero=0,
                              pp_schedule="gpipe", microbatches=2, precision="16-mixed")
    with pytest.raises(InputError, match="4 does not divide small-llama's 2 key/value heads") as refused:
        estimate(training, model=spec)
    assert refused.value.field == "tp" and refused.value.allowed == "1, 2"
