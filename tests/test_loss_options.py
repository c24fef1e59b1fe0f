"""--loss chunked / fused-linear: the estimate follows the trace, the saving is real, bad values are refused."""

from __future__ import annotations

import pytest

from memtui.cli import main
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace import assert_estimate_matches_trace

# Qwen2.5-0.5B's chunked and fused-linear losses at batch 2 x 2048 are held to their traces by
# test_the_saving_is_real_at_long_sequence, which traces them anyway (each trace is ~10 s).
CASES = [
    dict(model="llama-3.2-1b", loss="chunked", batch_size=2, seq_len=1024, precision="bf16-true"),
    dict(model="llama-3.2-1b", loss="fused-linear", batch_size=1, seq_len=2048),
    # LitGPT's chunked head and bf16 chunked_cross_entropy: a batch above 1 copies the sliced last chunk
    dict(model="llama-3.2-1b", loss="chunked", loss_dtype="compute", batch_size=2, seq_len=1024,
         precision="bf16-true"),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_matches_trace(options):
    assert_estimate_matches_trace(options, 0.002)


def test_the_saving_is_real_at_long_sequence():
    """Traced peaks: standard > chunked > fused-linear on a 150k vocabulary at 4k tokens; the chunked and the
    fused-linear estimates follow these traces within 0.2% (as test_estimate_matches_trace's cases)."""
    from memtui.engine.trace.runner import trace

    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    peaks, estimated = {}, {}
    for loss in ("standard", "chunked", "fused-linear"):
        config = TrainingConfig(gpu="h100-80gb", model="qwen2.5-0.5b", batch_size=2, seq_len=2048, loss=loss)
        peaks[loss] = trace(config).traced_tensor_peak_bytes
        estimated[loss] = estimate(config).tensor_peak_bytes - workspace
    assert peaks["chunked"] < peaks["standard"] * 0.95
    assert peaks["fused-linear"] < peaks["chunked"] * 0.9
    off = {loss: (estimated[loss], peaks[loss]) for loss in ("chunked", "fused-linear")
           if abs(estimated[loss] - peaks[loss]) / peaks[loss] >= 0.002}
    assert not off, off


def test_the_losses_agree_in_value_and_gradients():
    """The three losses train the same thing: same loss, same gradients (fp32 on a tiny model)."""
    import copy

    import torch

    from memtui.engine.model.architectures import model_spec_from_config
    from memtui.engine.model.presets import resolve_model
    from memtui.engine.torchside.build import build_model, causal_lm_loss

    config = copy.deepcopy(resolve_model("llama-3.2-1b").hf_config())
    config.update(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_hidden_layers=2, vocab_size=512, tie_word_embeddings=True)
    spec = model_spec_from_config(config, model_id="tiny-llama", source="test")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for loss, dtype, upcast in (("standard", "fp32", "loss"), ("chunked", "fp32", "loss"),
                                ("fused-linear", "fp32", "loss"), ("chunked", "compute", "loss"),
                                ("standard", "fp32", "model")):
        torch.manual_seed(0)
        model = build_model(spec, TrainingConfig(model="llama-3.2-1b", precision="32-true", loss=loss, loss_chunks=3,
                                                 loss_dtype=dtype, logits_upcast=upcast))
        value = causal_lm_loss(model, ids, ids)
        value.backward()
        key = loss if dtype == "fp32" and upcast == "loss" else f"{loss}-{dtype}" if upcast == "loss" else upcast
        results[key] = (value.detach(), model.model.embed_tokens.weight.grad, model.model.norm.weight.grad)
    for loss in ("chunked", "fused-linear", "chunked-compute", "model"):
        for got, want in zip(results[loss], results["standard"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("argv", "names"), [
    (["--loss-chunks", "0"], "--loss-chunks"),
    (["--loss", "liger"], "--loss"),
    (["--loss", "chunked", "--gpus", "2"], "--gpus"),
    (["--loss-dtype", "compute"], "--loss-dtype"),
    (["--loss", "fused-linear", "--loss-dtype", "compute"], "--loss-dtype"),
    (["--loss-dtype", "bf16"], "--loss-dtype"),
    (["--loss", "chunked", "--logits-upcast", "model"], "--logits-upcast"),
    (["--logits-upcast", "fp32"], "--logits-upcast"),
])
def test_bad_values_are_one_line_errors(capsys, argv, names):
    try:
        code = main(["estimate", *argv])
    except SystemExit as exit_info:  # argparse refuses a bad choice itself
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err


def test_the_ladder_shows_the_saving():
    from memtui.engine.planning.ladder import savings_ladder

    config = TrainingConfig(model="qwen2.5-0.5b", batch_size=2, seq_len=4096, loss="fused-linear")
    rung = next(step for step in savings_ladder(config).steps if step.keys == ("loss",))
    assert rung.label == "fused linear cross-entropy (no logits)"
    assert rung.removed_total > 2**30


@pytest.mark.parametrize(("loss", "dtype", "precision"), [("chunked", "fp32", "bf16-mixed"),
                                                          ("fused-linear", "fp32", "bf16-mixed"),
                                                          ("chunked", "compute", "bf16-true")])
def test_fake_trace_equals_a_real_cpu_run(loss, dtype, precision):
    """The pure-torch losses allocate the same on fake tensors as on real ones."""
    from memtui.engine.trace.analysis import summarize
    from memtui.engine.trace.fake_step import run_fake_steps

    from tests.test_trace import tiny_llama

    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=32, precision=precision, loss=loss,
                            loss_chunks=4, loss_dtype=dtype)
    fake, real = (summarize(run_fake_steps(tiny_llama(), config, fake=fake)[0]) for fake in (True, False))
    assert fake.peak_bytes == real.peak_bytes
    assert [(p.phase, p.peak_bytes) for p in fake.phases] == [(p.phase, p.peak_bytes) for p in real.phases]


def test_a_model_that_soft_caps_its_logits_refuses_the_chunked_and_fused_losses(tmp_path):
    """Neither torchtune's chunked loss nor a fused linear cross-entropy applies final_logit_softcapping."""
    import json
    from pathlib import Path

    from memtui.engine.errors import InputError

    for loss in ("chunked", "fused-linear"):
        with pytest.raises(InputError) as error:
            estimate(TrainingConfig(model="gemma-2-9b", loss=loss))
        assert error.value.field == "loss" and "soft-cap" in str(error.value)
        estimate(TrainingConfig(model="gemma-3-1b", loss=loss))  # released Gemma 3 configs cap nothing
    preset = Path(__file__).resolve().parent.parent / "presets" / "models" / "gemma-3-1b.json"
    capped = {**json.loads(preset.read_text()), "final_logit_softcapping": 30.0}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(capped))
    with pytest.raises(InputError) as error:
        estimate(TrainingConfig(model=str(config_file), loss="chunked"))
    assert error.value.field == "loss"


def test_a_compute_dtype_loss_keeps_16_bit_log_probabilities():
    """LitGPT's loss (bf16-true, LoRA, 128k vocabulary): the fp32 upcast's chunk and fp32 log-probabilities go, the
    loop's logits stay; the estimate falls by about the difference, and the ladder names the rung."""
    from memtui.engine.planning.ladder import savings_ladder

    litgpt = dict(model="llama-3.2-1b", gpu="a10", precision="bf16-true", batch_size=1, seq_len=512, lora_rank=32,
                  loss="chunked", loss_chunks=4, lora_dtype="compute")
    upcast = estimate(TrainingConfig(**litgpt)).tensor_peak_bytes
    compute = estimate(TrainingConfig(**litgpt, loss_dtype="compute")).tensor_peak_bytes
    logits_bf16 = 512 * 128256 * 2
    assert 0.5 * logits_bf16 < upcast - compute < 2 * logits_bf16
    rungs = savings_ladder(TrainingConfig(**litgpt, loss_dtype="compute")).steps
    assert any(step.keys == ("loss",) and step.label.endswith(" + loss in the compute dtype (no fp32 upcast)")
               for step in rungs)


def test_litgpt_chunked_head_is_accepted_on_a_soft_capping_model():
    """LitGPT's chunked head returns before final_logit_softcapping: chunked + compute caps nothing, and is
    estimated; chunked alone (torchtune, which caps) is still refused."""
    from memtui.engine.errors import InputError

    budget = estimate(TrainingConfig(model="gemma-2-9b", precision="bf16-true", lora_rank=16, loss="chunked",
                                     loss_chunks=4, loss_dtype="compute", seq_len=512))
    assert budget.tensor_peak_bytes > 0
    with pytest.raises(InputError):
        estimate(TrainingConfig(model="gemma-2-9b", loss="chunked"))


def test_logits_upcast_in_the_model_returns_fp32_logits_and_follows_the_trace():
    """torchtune's TransformerDecoder returns self.output(h).float(): the 16-bit head output is a temporary and the
    model's logits are fp32. Compiled, the loss then saves fp32 logits instead of 16-bit ones (a higher peak);
    eager and compiled, the estimate equals the trace."""
    import torch

    from memtui.engine.torchside.build import build_model
    from memtui.engine.trace.runner import trace
    from tests.test_compile import small

    spec = small("llama-3.2-1b", vocab_size=32000)
    model = build_model(spec, TrainingConfig(model="llama-3.2-1b", precision="bf16-true", logits_upcast="model"))
    assert model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.dtype == torch.float32
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    peaks = {}
    for compile in (False, True):
        for upcast in ("loss", "model"):
            config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", batch_size=1, seq_len=512,
                                    precision="bf16-true", compile=compile, logits_upcast=upcast)
            traced = trace(config, model=spec).traced_tensor_peak_bytes
            estimated = estimate(config, model=spec).tensor_peak_bytes - workspace
            assert abs(estimated - traced) / traced < 0.002, (compile, upcast, estimated, traced)
            peaks[compile, upcast] = traced
    assert peaks[True, "model"] - peaks[True, "loss"] >= 512 * 32000 * 2  # at least the fp32 half of the logits
