"""LoRA on the output head (`lm_head` in --lora-targets) and bitsandbytes before 0.43.2 (--bnb-version legacy):
the estimate follows the trace, the build does what peft and old bitsandbytes do, combinations that cannot be
modelled are refused in one line, LitGPT's lora_head maps, and the planner has the input."""

from __future__ import annotations

import json

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.model.presets import resolve_model
from memtui.engine.model.specs import TrainingConfig
from tests.test_cli import run_cli
from tests.test_trace import assert_estimate_matches_trace

QLORA = dict(model="llama-3.2-1b", lora_rank=16, lora_targets="all-linear", seq_len=512, precision="bf16-true",
             quant="nf4")

# One trace each (the full-size rows are in benchmarks/accuracy.py). Llama 3.2 1B ties its head to the embedding.
CASES = [
    dict(model="llama-3.2-1b", lora_rank=16, lora_targets="q_proj,v_proj,lm_head", seq_len=512,
         precision="bf16-true", lora_dropout=0.05),
    dict(QLORA, bnb_version="legacy", checkpointing="full"),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_matches_trace(options):
    assert_estimate_matches_trace(options, 0.002)


def test_the_head_adapter_adds_its_parameters_and_logits_sized_work():
    spec = resolve_model("llama-3.2-1b")
    base = TrainingConfig(model="llama-3.2-1b", lora_rank=16, precision="bf16-true", seq_len=1024)
    head = base.model_copy(update={"lora_targets": "q_proj,v_proj,lm_head"})
    plain, adapted = estimate(base), estimate(head)
    # A is r x hidden, B is vocab x r: fp32 (peft's default) parameters, gradients and AdamW's two moments.
    extra = 16 * (spec.hidden_size + spec.vocab_size)
    assert adapted.model.trainable_params - plain.model.trainable_params == extra
    assert adapted.model_states.weights - plain.model_states.weights == 4 * extra
    assert adapted.model_states.optimizer_states - plain.model_states.optimizer_states == 2 * 4 * extra
    # lora_B's vocabulary-wide output at the loss: the peak grows by more than the adapter's states.
    assert adapted.tensor_peak_bytes - plain.tensor_peak_bytes > 4 * 4 * extra


def test_legacy_bitsandbytes_keeps_each_4bit_input_through_backward():
    current = TrainingConfig(**QLORA, checkpointing="full")
    legacy = current.model_copy(update={"bnb_version": "legacy"})
    # Checkpointing cannot drop a ctx attribute: every layer keeps its 4-bit layers' 16-bit inputs.
    assert estimate(legacy).tensor_peak_bytes > estimate(current).tensor_peak_bytes
    assert estimate(legacy).per_gpu.activations > estimate(current).per_gpu.activations
    # Without a 4-bit base it changes nothing, and says so.
    plain = TrainingConfig(model="llama-3.2-1b", lora_rank=16)
    assert estimate(plain.model_copy(update={"bnb_version": "legacy"})).tensor_peak_bytes == estimate(plain).tensor_peak_bytes
    assert any("0.43.2" in note for note in estimate(plain.model_copy(update={"bnb_version": "legacy"})).notes)


def test_the_build_adapts_the_head_and_the_legacy_replica_keeps_its_input():
    import torch

    from memtui.engine.torchside.build import build_model
    from memtui.engine.torchside.replicas import Nf4LinearReplica
    from tests.test_trace import tiny_llama

    config = TrainingConfig(model="llama-3.2-1b", precision="bf16-true", lora_rank=4, lora_targets="q_proj,lm_head")
    model = build_model(tiny_llama(), config, quant_backend="replica")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.lora_A" in name for name in names) and any("lm_head.lora_B" in name for name in names)

    layer = Nf4LinearReplica(64, 32, False, torch.bfloat16, keeps_input=True)
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.grad_fn is not None
    # The legacy MatMul4Bit node holds its input (a ctx attribute) after the layer's forward returns.
    holders = [out.grad_fn] + [next_fn for next_fn, _ in out.grad_fn.next_functions if next_fn is not None]
    assert any(getattr(node, "tensors", (None,))[0] is x for node in holders)


@pytest.mark.parametrize(("argv", "flag", "allowed"), [
    (["--lora-rank", "8", "--lora-targets", "all-linear,lm_head", "--loss", "fused-linear"], "--lora-targets",
     "without lm_head"),
    (["--lora-rank", "8", "--lora-targets", "lm_head", "--gpus", "2"], "--lora-targets", "--gpus 1"),
    (["--lora-rank", "8", "--lora-targets", "q_proj,head"], "--lora-targets", "lm_head"),
    (["--bnb-version", "0.42"], "--bnb-version", "current, legacy"),
    (["--bnb-version", "legacy", "--quant", "int8", "--lora-rank", "8"], "--bnb-version", "legacy with --quant nf4"),
    (["--bnb-version", "legacy", "--quant", "nf4", "--lora-rank", "8", "--gpus", "2"], "--bnb-version", "--gpus 1"),
])
def test_bad_values_are_one_line_errors(capsys, argv, flag, allowed):
    code, out, err = run_cli(capsys, "estimate", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"memtui: error: {flag}: ") and allowed in err


def test_litgpt_lora_head_maps_to_the_lm_head_target(tmp_path, capsys):
    from memtui.engine.model.framework_configs import read_framework_config

    path = tmp_path / "lora.yaml"
    path.write_text("checkpoint_dir: checkpoints/meta-llama/Llama-3.2-1B\nprecision: bf16-true\nlora_r: 8\n"
                    "lora_query: true\nlora_value: true\nlora_head: true\n")
    read = read_framework_config(path)
    assert read.options["lora_targets"] == "q_proj,v_proj,lm_head"
    assert not any("lora_head" in note for note in read.notes)
    code, from_file, _err = run_cli(capsys, "estimate", "--from", str(path), "--json")
    code_flags, from_flags, _err = run_cli(capsys, "estimate", "--json", *(
        f"--model llama-3.2-1b --precision bf16-true --lora-rank 8 --lora-targets q_proj,v_proj,lm_head "
        "--lora-dropout 0.05 --lora-dtype compute --loss chunked --loss-chunks 16 --loss-dtype compute").split())
    assert code == code_flags == 0
    assert json.loads(from_file)["tensor_peak_bytes"] == json.loads(from_flags)["tensor_peak_bytes"]


@pytest.mark.anyio
async def test_the_planner_has_the_release_input_and_it_moves_the_budget():
    from tests.test_tui_app import WIDE, make_app, ready, set_select

    app = make_app(options=dict(QLORA, checkpointing="full"))
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        before = app.result.budget.tensor_peak_bytes
        await set_select(pilot, "bnb_version", "legacy")
        assert app.result.config.bnb_version == "legacy" and not app.result.stale
        assert app.result.budget.tensor_peak_bytes > before


@pytest.mark.parametrize(("installed", "refused"), [(None, True), ((0, 45, 0), True), ((0, 42, 0), False)])
def test_a_live_legacy_run_needs_a_bitsandbytes_before_0_43_2(monkeypatch, installed, refused):
    """Real bitsandbytes runs on CUDA behave as the installed release: legacy is refused (or, with
    --if-unsupported skip, run as current) unless that release is before 0.43.2."""
    from memtui.engine.live import plan as live_plan
    from memtui.engine.live.plan import LiveOptions, make_plan
    from tests.test_live_plan import GPU

    monkeypatch.setattr(live_plan, "_bitsandbytes_version", lambda: installed)
    monkeypatch.setattr(live_plan.importlib.util, "find_spec", lambda name: object())
    config = TrainingConfig(**QLORA, bnb_version="legacy")
    plan = make_plan(config, LiveOptions(device="cuda"), GPU)
    assert ("0.43.2" in plan.refusal) is refused
    skipped = make_plan(config, LiveOptions(device="cuda", if_unsupported="skip"), GPU)
    assert skipped.config.bnb_version == ("current" if refused else "legacy")


def test_a_generic_model_refuses_the_head_adapter(capsys, tmp_path, monkeypatch):
    from memtui.cli import main
    from tests.test_generic import DATA

    monkeypatch.setenv("MEMTUI_CACHE_DIR", str(tmp_path))
    code = main(["estimate", "--model", str(DATA / "falcon.json"), "--lora-rank", "8", "--lora-targets", "lm_head"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("memtui: error: --lora-targets: ") and "generic" in err
