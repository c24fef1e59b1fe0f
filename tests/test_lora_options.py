"""--lora-dropout, --lora-dtype and --kbit-prep: the estimate follows the trace, the build does what peft does,
bad values are refused in one line, and the planner has an input for each that moves the budget."""

from __future__ import annotations

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.model.specs import TrainingConfig
from tests.test_cli import run_cli
from tests.test_trace import assert_estimate_matches_trace

ALL_LINEAR = dict(model="llama-3.2-1b", lora_rank=16, lora_targets="all-linear", seq_len=1024)

# One trace per case, each covering several options (the full-size rows are in benchmarks/accuracy.py). The first
# at 4 of Llama's 16 layers (real widths): traced at 5 and 6 layers and extended it took ~12 s, the others ~4 s.
CASES = [
    dict(ALL_LINEAR, layers=4, precision="bf16-true", quant="nf4", lora_dropout=0.05),
    dict(ALL_LINEAR, lora_dropout=0.1, checkpointing="full"),
    dict(ALL_LINEAR, quant="nf4", lora_dtype="compute"),
    dict(model="qwen2.5-0.5b", lora_rank=16, seq_len=512, precision="bf16-true", quant="int8", lora_dtype="compute"),
    dict(model="llama-3.2-1b", lora_rank=16, seq_len=1024, quant="nf4", kbit_prep=True, checkpointing="full"),
    # Qwen2's q/k/v biases on a 4-bit base, fp32 after the prep; dropout on the fp32 hidden states.
    dict(model="qwen2.5-0.5b", lora_rank=16, seq_len=512, precision="bf16-true", quant="nf4", kbit_prep=True,
         lora_dropout=0.1),
    # GPT-2's Conv1D layers, quantized as transformers does; k-bit prep makes the rest fp32.
    dict(model="gpt2", lora_rank=8, lora_targets="c_attn", seq_len=512, batch_size=2, quant="nf4", kbit_prep=True,
         lora_dtype="compute", lora_dropout=0.1),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_matches_trace(options):
    assert_estimate_matches_trace(options, 0.002)


def test_each_option_moves_the_estimate_the_way_peft_does():
    base = TrainingConfig(**ALL_LINEAR, precision="bf16-true")
    peak = estimate(base).tensor_peak_bytes
    # Dropout keeps a copy of each adapted input (and its mask) for backward.
    assert estimate(base.model_copy(update={"lora_dropout": 0.1})).per_gpu.activations > estimate(base).per_gpu.activations
    # bf16 adapters: no fp32 input copies, half the adapter states.
    compute = estimate(base.model_copy(update={"lora_dtype": "compute"}))
    assert compute.tensor_peak_bytes < peak
    assert compute.model_states.optimizer_states * 2 == estimate(base).model_states.optimizer_states
    # Under autocast the model's weights are fp32: the adapters are fp32 either way.
    mixed = TrainingConfig(**ALL_LINEAR)
    same = estimate(mixed.model_copy(update={"lora_dtype": "compute"}))
    assert (same.tensor_peak_bytes, same.model_states) == (estimate(mixed).tensor_peak_bytes, estimate(mixed).model_states)
    # k-bit prep: fp32 norms, embeddings and head.
    qlora = base.model_copy(update={"quant": "nf4"})
    prepared = estimate(qlora.model_copy(update={"kbit_prep": True}))
    assert prepared.model_states.weights > estimate(qlora).model_states.weights
    assert prepared.tensor_peak_bytes > estimate(qlora).tensor_peak_bytes


def test_the_build_holds_what_the_options_say():
    """Adapters and unquantized weights in the dtype each option names, dropout layers where it is on."""
    import torch

    from memtui.engine.torchside.build import build_model
    from tests.test_trace import tiny_llama

    def dtypes(config):
        model = build_model(tiny_llama(), config, quant_backend="replica")
        adapters = {p.dtype for name, p in model.named_parameters() if "lora_" in name}
        norms = {p.dtype for name, p in model.named_parameters() if "norm" in name or "embed" in name}
        dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
        return adapters, norms, dropouts

    true = dict(model="llama-3.2-1b", precision="bf16-true", lora_rank=4, lora_targets="all-linear")
    adapters, norms, dropouts = dtypes(TrainingConfig(**true))
    assert adapters == {torch.float32} and norms == {torch.bfloat16}
    assert all(isinstance(module, torch.nn.Identity) for module in dropouts)
    adapters, _, dropouts = dtypes(TrainingConfig(**true, lora_dtype="compute", lora_dropout=0.1))
    assert adapters == {torch.bfloat16} and dropouts and all(m.p == 0.1 for m in dropouts)
    for quant in ("nf4", "int8"):
        adapters, norms, _ = dtypes(TrainingConfig(**true, quant=quant, lora_dtype="compute"))
        assert adapters == {torch.bfloat16} and norms == {torch.bfloat16}, quant
        adapters, norms, _ = dtypes(TrainingConfig(**true, quant=quant, kbit_prep=True))
        assert adapters == {torch.float32} and norms == {torch.float32}, quant


@pytest.mark.parametrize(("argv", "flag", "allowed"), [
    (["--lora-dropout", "1"], "--lora-dropout", "0 <= P < 1"),
    (["--lora-dropout", "-0.1"], "--lora-dropout", "0 <= P < 1"),
    (["--lora-dropout", "half"], "--lora-dropout", "0 <= P < 1"),
    (["--lora-dtype", "bf16"], "--lora-dtype", "fp32, compute"),
    (["--kbit-prep", "--lora-rank", "8"], "--kbit-prep", "--quant nf4, int8"),
])
def test_bad_values_are_one_line_errors(capsys, argv, flag, allowed):
    code, out, err = run_cli(capsys, "estimate", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"memtui: error: {flag}: ") and allowed in err


def test_the_ladder_has_a_rung_for_compute_adapters_and_keeps_kbit_prep_with_the_quantization():
    from memtui.engine.planning.ladder import savings_ladder

    config = TrainingConfig(**ALL_LINEAR, precision="bf16-true", quant="nf4", kbit_prep=True, lora_dtype="compute",
                            lora_dropout=0.05)
    steps = savings_ladder(config).steps
    assert steps[-1].config == config
    rung = next(step for step in steps if step.keys == ("lora_dtype",))
    assert rung.label == "LoRA adapters in the model's dtype" and rung.removed_total > 0
    quant = next(step for step in steps if step.keys == ("quant",))
    assert quant.label.endswith("+ k-bit prep (fp32 norms, embeddings, head)")


@pytest.mark.anyio
async def test_the_planner_has_an_input_for_each_and_each_moves_the_budget():
    from textual.widgets import Checkbox, Input

    from tests.test_tui_app import WIDE, make_app, note, ready, row, set_select, settled, type_into

    app = make_app(options=dict(model="llama-3.2-1b", precision="bf16-true", lora_rank=16, lora_targets="all-linear",
                                quant="nf4", seq_len=1024))
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        before = app.result.budget.tensor_peak_bytes
        await type_into(pilot, "lora_dropout", "0.1")
        assert app.query_one("#opt-lora_dropout", Input).value == "0.1"
        assert app.planner.options["lora_dropout"] == 0.1 and not app.result.stale
        with_dropout = app.result.budget.tensor_peak_bytes
        assert with_dropout > before
        await type_into(pilot, "lora_dropout", "1.5")
        assert row(app, "lora_dropout").has_class("-invalid") and "0 <= P < 1" in note(app, "lora_dropout")
        await type_into(pilot, "lora_dropout", "0.1")
        await set_select(pilot, "lora_dtype", "compute")
        assert app.result.budget.tensor_peak_bytes < with_dropout
        compute = app.result.budget.tensor_peak_bytes
        switch = app.query_one("#opt-kbit_prep", Checkbox)
        switch.value = True
        await settled(pilot)
        assert app.result.config.kbit_prep and app.result.budget.tensor_peak_bytes > compute


def test_a_live_run_on_a_cpu_without_the_quantization_drops_the_kbit_prep_too():
    """bitsandbytes needs CUDA: with --if-unsupported skip the CPU run goes on unquantized, and k-bit prep (which
    needs a quantized base) goes with the quantization instead of refusing the run."""
    from memtui.engine.live.plan import LiveOptions, make_plan
    from tests.test_live_plan import CPU

    config = TrainingConfig(model="llama-3.2-1b", quant="nf4", kbit_prep=True, lora_rank=16, lora_dropout=0.1)
    plan = make_plan(config, LiveOptions(device="cpu", if_unsupported="skip"), CPU)
    assert not plan.refusal
    assert (plan.config.quant, plan.config.kbit_prep, plan.config.lora_dropout) == ("none", False, 0.1)


def test_peft_holds_the_cast_input_until_its_forward_returns():
    """peft's lora.Linear rebinds `x` to the input cast to the adapter's dtype (fp32 under bf16-mixed): down_proj's
    and o_proj's 16-bit inputs have an fp32 copy alive until the layer's forward returns, past lora_A, beside
    lora_B's output and the sum (a small Llama under FSDP2, whose peak is a forward one: 0.6% under before)."""
    from tests.test_trace_pp_combined import small_llama
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.model.presets import resolve_gpu
    from memtui.engine.trace import trace

    spec = small_llama(layers=2)
    training = TrainingConfig(model="llama-3.2-1b", batch_size=1, seq_len=128, lora_rank=8, lora_targets="all-linear",
                              gpus=2, zero=3)
    traced = trace(training, model=spec)
    traced_forward = max(p["peak_bytes"] for p in traced.phase_peaks if p["step"] == 2 and p["phase"] == "forward")
    estimated = estimate(training, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(training.gpu))
    forward = max(point.bytes for point in estimated.timeline if point.phase == "forward") - workspace
    assert forward == pytest.approx(traced_forward, rel=1e-3)
