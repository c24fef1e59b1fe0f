"""--float8 tensorwise: torchao's Float8Linear in the decoder layers (torchtitan's float8 converter), traced through
memtui's stand-in of torchao's ops and estimated op by op alike."""

from __future__ import annotations

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace_parallel import tiny_llama

SPEC = tiny_llama(layers=2)


def config(**options) -> TrainingConfig:
    return TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=256, precision="bf16-mixed", **options)


@pytest.mark.parametrize(("options", "differs"), [({}, True), ({"checkpointing": "selective-op"}, True),
                                                  # FSDP2 casting: this tiny model peaks at its loss either way
                                                  ({"gpus": 4, "zero": 3, "fsdp_param_dtype": "compute"}, False)])
def test_the_estimate_is_the_trace_of_float8_linears(options, differs):
    from memtui.engine.trace import trace

    float8 = config(float8="tensorwise", **options)
    traced = trace(float8, model=SPEC).budget.tensor_peak_bytes
    assert estimate(float8, model=SPEC).tensor_peak_bytes == pytest.approx(traced, rel=0.002)
    plain = trace(config(**options), model=SPEC).budget.tensor_peak_bytes
    assert (traced != plain) == differs  # the float8 casts' temporaries (and _scaled_mm saved under selective-op) show


def test_the_decoder_linears_become_float8_and_the_head_does_not():
    import torch

    from memtui.engine.torchside.build import build_model
    from memtui.engine.torchside.float8 import Float8Linear

    with torch.device("meta"):
        model = build_model(SPEC, config(float8="tensorwise"), device="meta")
    converted = [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
    assert len(converted) == 7 * SPEC.num_layers and not isinstance(model.lm_head, Float8Linear)


def test_the_stand_in_saves_the_high_precision_input_and_casts_in_backward():
    """matmul_with_hp_or_float8_args saves the bf16 input and weight, not their float8 casts; backward casts the
    output gradient twice, the weight and the input again (float8 copies appear in backward)."""
    import torch

    from memtui.engine.torchside.float8 import _Float8Matmul

    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(48, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.dtype), t)[1], lambda t: t):
        saved: list = []
        out = _Float8Matmul.apply(x, weight.t())
    assert saved == [torch.bfloat16, torch.bfloat16] and out.dtype == torch.bfloat16
    made = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                made.append(result.dtype)
            return result

    with Watch():
        out.sum().backward()
    assert made.count(torch.float8_e5m2) >= 2 and made.count(torch.float8_e4m3fn) >= 2
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape


def test_estimate_counts_the_cast_temporaries():
    """The same step without the float8 casts' temporaries would peak lower: removing the mechanism fails this."""
    float8 = estimate(config(float8="tensorwise", checkpointing="full"), model=SPEC)
    plain = estimate(config(checkpointing="full"), model=SPEC)
    big = estimate(TrainingConfig(model="llama-3.1-8b", precision="bf16-true", seq_len=8192, checkpointing="full",
                                  optimizer="sgd", float8="tensorwise"))
    big_plain = estimate(TrainingConfig(model="llama-3.1-8b", precision="bf16-true", seq_len=8192,
                                        checkpointing="full", optimizer="sgd"))
    assert float8.per_gpu.weights == plain.per_gpu.weights
    # backward's fp32 scaled and clamped copies of a 8192 x 14336 gradient and its float8 copies: > 0.5 GiB
    assert big.tensor_peak_bytes - big_plain.tensor_peak_bytes > 2**29


@pytest.mark.parametrize(("flags", "named"), [
    (["--lora-rank", "8"], "--lora-rank"),
    (["--precision", "16-mixed"], "--precision"),
    (["--tp", "2", "--gpus", "2"], "--tp"),
    (["--model", "gpt2", "--precision", "bf16-mixed"], "off"),
])
def test_refusals_name_the_flag(capsys, flags, named):
    from tests.test_cli import run_cli

    code, _out, error = run_cli(capsys, "estimate", "--model", "llama-3.2-1b", "--precision", "bf16-mixed",
                                "--float8", "tensorwise", *flags)
    assert code == 2 and "--float8" in error and named in error and len(error.strip().splitlines()) == 1


def test_a_bad_value_lists_the_recipes(capsys):
    from tests.test_cli import run_cli

    code, _out, error = run_cli(capsys, "estimate", "--float8", "rowwise")
    assert code == 2 and "--float8" in error and "off, tensorwise" in error


def test_the_live_run_refuses_float8_on_the_cpu():
    from memtui.engine.live.plan import _cuda_only

    (flag, replacement, reason), = _cuda_only(config(float8="tensorwise"))
    assert flag == "--float8" and replacement == {"float8": "off"} and "8.9" in reason


def test_torchtitan_float8_converter_maps_to_tensorwise(tmp_path, capsys):
    from tests.test_from_file import estimate_json

    path = tmp_path / "job.toml"
    path.write_text('[model]\nname = "llama3"\nflavor = "8B"\nconverters = ["float8"]\n[training]\n'
                    'local_batch_size = 1\nseq_len = 2048\n[parallelism]\ndata_parallel_shard_degree = 8\n'
                    '[float8]\nenable_fsdp_float8_all_gather = true\n')
    data = estimate_json(capsys, "--from", str(path))
    assert data["config"]["float8"] == "tensorwise"
    assert any(note.startswith("ignored: float8.enable_fsdp_float8_all_gather") for note in data["notes"])


def test_the_savings_ladder_has_a_float8_rung():
    from memtui.engine.planning.ladder import savings_ladder

    training = TrainingConfig(model="llama-3.2-1b", precision="bf16-mixed", checkpointing="full", float8="tensorwise")
    steps = savings_ladder(training).steps
    assert steps[-1].keys == ("float8",) and steps[-1].config == training
