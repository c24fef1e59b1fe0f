"""The estimator against public figures (../shared/reference/facts.md) and its own invariants."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.estimator import estimate
from memtui.engine.model.presets import resolve_model
from memtui.engine.model.specs import TrainingConfig

GB = 10**9


def states_total(budget) -> int:
    return budget.model_states.weights + budget.model_states.gradients + budget.model_states.optimizer_states


def test_fp32_adam_is_16_bytes_per_parameter_and_8b_does_not_fit_an_a100():
    budget = estimate(TrainingConfig(model="llama-3.1-8b", gpu="a100-80gb", precision="32-true"))
    params = budget.model.params
    assert params == 8_030_261_248
    assert budget.model_states.weights == 4 * params
    assert budget.model_states.gradients == 4 * params
    assert budget.model_states.optimizer_states == 8 * params
    assert budget.bytes_per_param == 16
    assert budget.fits is False


def _zero_paper_model(tmp_path):
    """A Llama-style 7.5B model, the size the ZeRO paper's Figure 1 uses."""
    config = copy.deepcopy(resolve_model("llama-3.1-8b").hf_config())
    config.update(num_hidden_layers=33, vocab_size=32000, tie_word_embeddings=False)
    spec = model_spec_from_config(config, model_id="zero-7.5b", source="test")
    assert abs(spec.params - 7.5e9) / 7.5e9 < 0.02
    return spec


@pytest.mark.parametrize(
    ("zero", "paper_gb"),
    [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)],
)
def test_zero_paper_figures_for_7_5b_on_64_gpus(tmp_path, zero, paper_gb):
    # ZeRO (Rajbhandari et al. 2020), Figure 1: Psi = 7.5B, N_d = 64, K = 12 (mixed-precision Adam).
    spec = _zero_paper_model(tmp_path)
    config = TrainingConfig(model="llama-3.1-8b", precision="bf16-true", master_weights=True, gpus=64, zero=zero)
    budget = estimate(config, model=spec)
    psi, nd = spec.params, 64
    expected = {
        0: (2 + 2 + 12) * psi,
        1: 2 * psi + 2 * psi + 12 * psi / nd,
        2: 2 * psi + (2 + 12) * psi / nd,
        3: (2 + 2 + 12) * psi / nd,
    }[zero]
    assert states_total(budget) == pytest.approx(expected, rel=1e-6)
    # And the paper's rounded figures, scaled to this model's exact size.
    assert states_total(budget) / GB == pytest.approx(paper_gb * psi / 7.5e9, rel=0.03)


@pytest.mark.parametrize("seq_len", [1024, 2048])  # at 4096 the logits and checkpoints no longer fit
def test_qlora_fits_70b_on_a_48gb_card_where_16bit_lora_does_not(seq_len):
    common = dict(model="llama-3.1-70b", gpu="rtx-a6000", precision="bf16-true", lora_rank=16,
                  checkpointing="full", seq_len=seq_len)
    qlora = estimate(TrainingConfig(quant="nf4", **common))
    lora16 = estimate(TrainingConfig(quant="none", **common))
    assert qlora.fits and qlora.device_peak_bytes < 48 * GB
    assert not lora16.fits and lora16.model_states.weights > 130 * GB
    # nf4 weights: about half a byte per parameter, plus the double-quantized constants.
    assert 0.5 < qlora.model_states.weights / qlora.model.params < 0.6


def test_per_gpu_components_add_up_to_the_device_peak():
    budget = estimate(TrainingConfig(model="llama-3.2-1b", batch_size=4, seq_len=4096))
    assert budget.per_gpu.total == budget.device_peak_bytes
    assert budget.tensor_peak_bytes <= budget.device_peak_bytes
    assert budget.headroom_bytes == budget.gpu.memory_bytes - budget.device_peak_bytes
    phases = [point.phase for point in budget.timeline]
    assert phases == ["start", "forward", "loss", "backward", "optimizer", "end"]
    assert 0 <= budget.tensor_peak_bytes - max(point.bytes for point in budget.timeline) < 512  # allocator blocks


# ---- properties --------------------------------------------------------------------------------
MODELS = ["gpt2", "qwen2.5-0.5b", "llama-3.2-1b", "phi-3-mini", "llama-3.1-8b", "mixtral-8x7b", "gemma-2-9b"]
configs = st.fixed_dictionaries(
    {
        "model": st.sampled_from(MODELS),
        "precision": st.sampled_from(["32-true", "bf16-mixed", "16-mixed", "bf16-true"]),
        "batch_size": st.sampled_from([1, 2, 4, 8]),
        "seq_len": st.sampled_from([256, 512, 1024, 2048, 4096]),
        # gpt2 has 1024 learned positions: its sequences are clamped below.
        "attention": st.sampled_from(["eager", "flash"]),
        "optimizer_impl": st.sampled_from(["foreach", "fused", "for-loop"]),
    }
)
def phase_bytes(budget, phase: str) -> int:
    return next(point.bytes for point in budget.timeline if point.phase == phase)


def config(options: dict, **changes) -> TrainingConfig:
    values = {**options, **changes}
    if values["model"] == "gpt2":
        values["seq_len"] = min(values["seq_len"], 1024)
    return TrainingConfig(**values)


PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(configs)
def test_memory_grows_with_batch_and_sequence(options):
    assume(options["model"] != "gpt2" or options["seq_len"] <= 512)  # gpt2 has 1024 positions
    base = estimate(config(options))
    bigger_batch = estimate(config(options, batch_size=options["batch_size"] * 2))
    longer = estimate(config(options, seq_len=options["seq_len"] * 2))
    assert bigger_batch.tensor_peak_bytes >= base.tensor_peak_bytes
    assert longer.tensor_peak_bytes >= base.tensor_peak_bytes
    assert bigger_batch.per_gpu.activations + bigger_batch.per_gpu.temporary >= 0


@PROPERTY_SETTINGS
@given(configs)
def test_checkpointing_never_grows_what_the_forward_keeps(options):
    # Not the step's peak: when gradients dominate the end of backward, a recomputed layer's transients can
    # add to it (traced: Mixtral fp32, eager, 2048 tokens, +16 MiB with full checkpointing). What shrinks
    # is the memory through the forward and the loss, flash attention or eager.
    none = estimate(config(options, checkpointing="none"))
    selective = estimate(config(options, checkpointing="selective"))
    full = estimate(config(options, checkpointing="full"))
    for phase in ("forward", "loss"):
        assert phase_bytes(full, phase) <= phase_bytes(selective, phase) <= phase_bytes(none, phase)


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "llama-3.2-1b", "gpt2", "gemma-2-9b", "mixtral-8x7b"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_selective_checkpointing_saves_activations_with_flash_attention(model, batch_size):
    """Selective keeps the matmul and attention outputs and recomputes the pointwise rest: between none and full."""
    options = dict(model=model, attention="flash", precision="bf16-true", batch_size=batch_size, seq_len=1024)
    none, selective, full = (estimate(TrainingConfig(**options, checkpointing=mode)) for mode in ("none", "selective", "full"))
    kept = {name: phase_bytes(budget, "loss") for name, budget in (("none", none), ("selective", selective), ("full", full))}
    assert kept["full"] < kept["selective"] < kept["none"]
    assert kept["none"] - kept["selective"] > (kept["none"] - kept["full"]) // 3  # a real share of what full saves


@PROPERTY_SETTINGS
@given(configs, st.sampled_from([2, 4, 8, 64]))
def test_zero_stages_and_more_gpus_never_grow_per_gpu_model_states(options, gpus):
    previous = None
    for zero in (0, 1, 2, 3):
        budget = estimate(config(options, gpus=gpus, zero=zero))
        states = budget.model_states
        if previous is not None:
            assert states.optimizer_states <= previous.optimizer_states
            assert states.gradients <= previous.gradients
            assert states.weights <= previous.weights
        previous = states
    for zero in (1, 2, 3):
        fewer = estimate(config(options, gpus=gpus, zero=zero))
        more = estimate(config(options, gpus=gpus * 2, zero=zero))
        assert states_total(more) <= states_total(fewer)


@PROPERTY_SETTINGS
@given(configs, st.sampled_from([8, 16, 64]))
def test_lora_and_quantization_shrink_what_they_target(options, rank):
    full = estimate(config(options))
    lora = estimate(config(options, lora_rank=rank, lora_targets="all-linear"))
    assert lora.model_states.gradients < full.model_states.gradients
    assert lora.model_states.optimizer_states < full.model_states.optimizer_states
    if options["precision"] != "32-true":
        nf4 = estimate(config(options, lora_rank=rank, lora_targets="all-linear", quant="nf4"))
        int8 = estimate(config(options, lora_rank=rank, lora_targets="all-linear", quant="int8"))
        assert nf4.model_states.weights < int8.model_states.weights < lora.model_states.weights


@PROPERTY_SETTINGS
@given(configs)
def test_smaller_optimizers_hold_less_state(options):
    adamw = estimate(config(options, optimizer="adamw")).model_states.optimizer_states
    for optimizer in ("adamw-8bit", "lion", "sgd-momentum", "adafactor", "sgd"):
        assert estimate(config(options, optimizer=optimizer)).model_states.optimizer_states < adamw


def test_offload_moves_optimizer_states_off_the_gpu_even_on_one_gpu():
    budget = estimate(TrainingConfig(model="llama-3.1-8b", offload="optimizer", zero=2))
    assert budget.model_states.optimizer_states == 0


@pytest.mark.parametrize("zero", [0, 1])
def test_ddp_keeps_a_bucket_copy_of_every_gradient_across_ranks(zero):
    """PyTorch DDP (gradient_as_bucket_view=False) holds flat buckets the size of all gradients."""
    single = estimate(TrainingConfig(model="llama-3.2-1b", zero=zero, gpus=1))
    ranks = estimate(TrainingConfig(model="llama-3.2-1b", zero=zero, gpus=2))
    gradient_bytes = single.model_states.gradients
    assert ranks.model_states.gradients == gradient_bytes  # not part of the ZeRO paper's model states
    if zero == 0:
        assert ranks.tensor_peak_bytes - single.tensor_peak_bytes == pytest.approx(gradient_bytes, abs=512)
    states = ranks.model_states  # a step starts with gradients set to None, the buckets still held
    assert ranks.timeline[0].bytes == states.weights + states.optimizer_states + gradient_bytes


def test_fsdp2_zero2_holds_the_shards_beside_the_gathered_weights():
    budget = estimate(TrainingConfig(model="llama-3.2-1b", zero=2, gpus=4))
    full_weights = estimate(TrainingConfig(model="llama-3.2-1b")).model_states.weights
    assert budget.model_states.weights == full_weights  # the ZeRO paper's P_os+g keeps weights whole
    # Plus the shards; the last layer's all-gather buffer is freed at the root's post-forward, before this
    # backward peak (tests/test_trace_parallel.py traces FSDP2 at the real world size).
    assert budget.peak_phase == "backward" and budget.per_gpu.weights == full_weights + full_weights // 4


def test_gpt2_conv1d_layers_are_quantized_as_transformers_does():
    """transformers' replace_with_bnb_linear converts GPT-2's Conv1D projections too (weights transposed)."""
    options = dict(model="gpt2", seq_len=1024, precision="bf16-true", lora_rank=8, lora_targets="all-linear")
    plain = estimate(TrainingConfig(**options))
    nf4 = estimate(TrainingConfig(**options, quant="nf4"))
    layer_weights = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert plain.model_states.weights - nf4.model_states.weights > layer_weights * (2 - 0.6)
    assert not any("Conv1D" in note for note in nf4.notes)


def test_optimizers_without_a_fused_kernel_are_modelled_as_their_loop():
    loop = estimate(TrainingConfig(model="llama-3.2-1b", optimizer="adafactor", optimizer_impl="for-loop"))
    fused = estimate(TrainingConfig(model="llama-3.2-1b", optimizer="adafactor", optimizer_impl="fused"))
    assert fused.tensor_peak_bytes == loop.tensor_peak_bytes
    assert any("no fused kernel" in note for note in fused.notes)


@pytest.mark.parametrize("zero", [2, 3])
def test_fsdp2_steps_the_optimizer_on_shards_alone(zero):
    """After backward FSDP2 frees the gathered weights: the optimizer moment holds 1/dp of them."""
    budget = estimate(TrainingConfig(model="llama-3.2-1b", zero=zero, gpus=4, optimizer="adamw", optimizer_impl="for-loop",
                                     seq_len=128))
    full_weights = estimate(TrainingConfig(model="llama-3.2-1b")).model_states.weights
    optimizer_moment = next(point.bytes for point in budget.timeline if point.phase == "optimizer")
    states = budget.model_states
    assert optimizer_moment < full_weights // 4 + states.gradients + states.optimizer_states + full_weights // 2


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_params_offload_still_gathers_the_computed_layers_onto_the_gpu(gpus):
    """Offloaded parameters are streamed in for compute: the layer computed and the one prefetched are on the GPU.
    One GPU is DeepSpeed's ZeRO-Offload (nothing resident between steps); several are FSDP2's CPUOffloadPolicy as
    traced (tests/test_trace_dp_quant.py), which offloads the parameters only: the 4-bit layers' quantization
    statistics stay on every GPU, and the root group (embeddings, head) is gathered beside the layers, whatever the
    GPU count."""
    options = dict(model="llama-3.1-70b", gpu="rtx-a6000", zero=3, quant="nf4", lora_rank=16, checkpointing="full",
                   precision="bf16-true", seq_len=8192, offload="optimizer+params")
    single = estimate(TrainingConfig(**options, gpus=1))
    budget = estimate(TrainingConfig(**options, gpus=gpus))
    layer = single.per_gpu.weights
    assert layer > 0  # the layers in flight
    if gpus == 1:
        assert budget.model_states.weights == 0
        return
    four_bit = estimate(TrainingConfig(**{**options, "offload": "none", "zero": 0, "gpus": 1})).model_states.weights
    assert 0 < budget.model_states.weights < four_bit // 30  # the statistics: 1/32 of the packed weights' bytes
    assert budget.per_gpu.weights > layer + budget.model_states.weights  # the root group too
    assert budget.per_gpu.weights == estimate(TrainingConfig(**options, gpus=2)).per_gpu.weights
