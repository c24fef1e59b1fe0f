"""memtui fit: every answer is checked against the estimator at and just past its boundary."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from memtui.engine.planning import fit
from memtui.cli import main
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.model.presets import gpus, models, resolve_model
from memtui.engine.model.specs import TrainingConfig


def fits(config: TrainingConfig, **changes) -> bool:
    return estimate(config.model_copy(update=changes)).fits


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- max batch ---------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(model="gpt2", gpu="t4", seq_len=1024),
        dict(model="llama-3.2-1b", gpu="rtx-4090", checkpointing="full"),
        dict(model="qwen2.5-0.5b", gpu="a10", attention="eager", precision="32-true", seq_len=512),
        dict(model="llama-3.1-8b", gpu="h100-80gb", lora_rank=16, lora_targets="all-linear", precision="bf16-true", gpus=4),
    ],
)
def test_max_batch_fits_and_one_more_does_not(options):
    config = TrainingConfig(**options)
    result = fit.max_batch_size(config)
    assert result.batch_size >= 1 and not result.at_least
    assert fits(config, batch_size=result.batch_size)
    assert not fits(config, batch_size=result.batch_size + 1)
    assert result.budget.config["batch_size"] == result.batch_size
    assert result.over_budget.device_peak_bytes > result.budget.gpu.memory_bytes
    assert result.as_json()["batch_size"] == result.batch_size


def test_max_batch_nothing_fits_says_so():
    result = fit.max_batch_size(TrainingConfig(model="llama-3.1-70b", gpu="rtx-4090"))
    assert result.batch_size == 0 and not result.fits and result.budget is None
    assert result.message.startswith("nothing fits")
    assert not fits(TrainingConfig(model="llama-3.1-70b", gpu="rtx-4090"), batch_size=1)


def test_max_batch_reports_at_least_at_the_cap():
    config = TrainingConfig(model="gpt2", gpu="h200-141gb", seq_len=128)
    result = fit.max_batch_size(config, limit=8)
    assert result.batch_size == 8 and result.at_least and "at least" in result.message


# ---- max sequence --------------------------------------------------------------


@pytest.mark.parametrize("multiple", [1, 128])
def test_max_seq_fits_and_one_more_step_does_not(multiple):
    config = TrainingConfig(model="llama-3.2-1b", gpu="rtx-4090", batch_size=2, attention="eager")
    result = fit.max_seq_len(config, multiple_of=multiple)
    assert result.seq_len > 0 and result.seq_len % multiple == 0
    assert result.limited_by == "memory"
    assert fits(config, seq_len=result.seq_len)
    assert not fits(config, seq_len=result.seq_len + multiple)


def test_max_seq_stops_at_learned_positions():
    result = fit.max_seq_len(TrainingConfig(model="gpt2", gpu="h100-80gb", seq_len=1024))
    assert result.seq_len == resolve_model("gpt2").max_position_embeddings == 1024
    assert result.limited_by == "model" and not result.at_least and not result.beyond_trained


def test_max_seq_past_the_trained_length_is_flagged_for_rope_models():
    config = TrainingConfig(model="qwen2.5-0.5b", gpu="h200-141gb", checkpointing="full")
    result = fit.max_seq_len(config, multiple_of=256)
    assert result.seq_len > resolve_model("qwen2.5-0.5b").max_position_embeddings
    assert result.beyond_trained and "RoPE" in result.message
    assert fits(config, seq_len=result.seq_len) and not fits(config, seq_len=result.seq_len + 256)


def test_max_seq_search_cap_is_reported_as_at_least():
    config = TrainingConfig(model="qwen2.5-0.5b", gpu="h200-141gb", checkpointing="full")
    result = fit.max_seq_len(config, limit=4096)
    assert result.seq_len == 4096 and result.at_least and result.limited_by == "search"


# ---- min GPUs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "zero"),
    [
        (dict(model="llama-3.1-8b", gpu="rtx-4090", checkpointing="full"), 3),
        (dict(model="llama-3.1-8b", gpu="a100-80gb", checkpointing="full"), 2),
        (dict(model="llama-3.1-70b", gpu="h100-80gb", tp=2, gpus=2, checkpointing="full"), 3),
    ],
)
def test_min_gpus_fits_and_one_rank_fewer_does_not(options, zero):
    config = TrainingConfig(**options)
    result = fit.min_gpus(config, zero=zero)
    group = config.tp * config.pp
    assert result.fits and result.gpus % group == 0 and result.data_parallel == result.gpus // group
    assert fits(config, gpus=result.gpus, zero=zero)
    assert result.data_parallel > 1
    assert not fits(config, gpus=result.gpus - group, zero=zero)


def test_min_gpus_without_zero_says_more_gpus_never_help():
    result = fit.min_gpus(TrainingConfig(model="llama-3.1-8b", gpu="rtx-4090"), zero=0)
    assert result.gpus is None and "never help" in result.message


def test_min_gpus_defaults_to_zero_3_and_reports_the_unsharded_floor():
    config = TrainingConfig(model="llama-3.1-70b", gpu="rtx-4090", seq_len=8192)
    result = fit.min_gpus(config)
    assert result.zero == 3 and result.gpus is None
    assert "not sharded" in result.message
    assert not fits(config, gpus=fit.GPU_LIMIT, zero=3)


def test_min_gpus_rejects_a_stage_offload_cannot_use():
    config = TrainingConfig(model="llama-3.1-8b", zero=3, gpus=2, offload="optimizer+params")
    with pytest.raises(InputError) as error:
        fit.min_gpus(config, zero=2)
    assert error.value.field == "--zero-for-gpus"


# ---- suggest ---------------------------------------------------------------------


def _without_step(config: TrainingConfig, plan: fit.Plan, dropped: fit.Step) -> TrainingConfig:
    changes = {}
    for step in plan.steps:
        if step is not dropped:
            changes.update({flag[2:].replace("-", "_"): after for flag, (_, after) in step.changes.items()})
    return config.model_copy(update=changes)


def under_margin(budget, margin: float = fit.DEFAULT_MARGIN) -> bool:
    # Paged optimizer states aside: the driver pages them out rather than run out of memory.
    return budget.device_required_bytes <= budget.gpu.memory_bytes * (1 - margin)


def assert_minimal(config: TrainingConfig, plan: fit.Plan) -> None:
    """The plan fits with the margin and every step is needed: without any one of them it does not."""
    assert estimate(plan.config).fits and under_margin(plan.budget)
    assert plan.config == _without_step(config, plan, dropped=None)
    for step in plan.steps:
        try:
            assert not under_margin(estimate(_without_step(config, plan, step))), f"{step.title} is not needed"
        except InputError:
            pass  # the others need it to be valid at all (e.g. offload needs ZeRO)


def test_suggest_nothing_when_it_already_fits():
    suggestion = fit.suggest(TrainingConfig(model="gpt2", gpu="rtx-4090", seq_len=1024))
    assert suggestion.fits_already and suggestion.plan is None and suggestion.fits


def test_suggest_leaves_a_margin_of_the_card_free():
    """Without a margin this plan peaks at 97% of the card; the default leaves 5% free."""
    config = TrainingConfig(model="llama-3.1-8b", gpu="rtx-4090", batch_size=4, seq_len=4096)
    tight = fit.suggest(config, margin=0.0).plan
    assert tight.budget.device_peak_bytes > tight.budget.gpu.memory_bytes * 0.95
    suggestion = fit.suggest(config)
    assert under_margin(suggestion.plan.budget) and "5% free" in suggestion.message
    assert_minimal(config, suggestion.plan)
    roomy = fit.suggest(config, margin=0.2).plan
    assert under_margin(roomy.budget, 0.2)


def test_fit_margin_flag_reaches_the_suggestion(capsys):
    code, out, _ = run_cli(capsys, "fit", "--suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--batch-size", "4",
                           "--seq-len", "4096", "--margin", "0", "--json")
    assert code == 0
    plan = json.loads(out)["suggest"]["plan"]
    assert plan["budget"]["device_peak_bytes"] > 0.95 * json.loads(out)["gpu_memory_bytes"]


def test_suggest_qlora_for_70b_on_a_4090():
    config = TrainingConfig(model="llama-3.1-70b", gpu="rtx-4090")
    suggestion = fit.suggest(config)
    plan = suggestion.plan
    assert plan is not None and plan.changes_training
    assert plan.config.quant == "nf4" and plan.config.lora_rank > 0
    assert_minimal(config, plan)
    # QLoRA needs more than one 24 GB card here, and no less invasive mode fits on any count QLoRA beats.
    assert plan.config.gpus > 1
    assert not fits(config, quant="nf4", lora_rank=16, lora_targets="all-linear", checkpointing="full")
    for alternative in suggestion.alternatives:
        assert not alternative.changes_training and alternative.config.lora_rank == 0
        assert estimate(alternative.config).fits
    assert "--quant nf4" in plan.flags


def test_suggest_prefers_same_training_options_over_lora():
    config = TrainingConfig(model="llama-3.2-1b", gpu="a100-40gb", precision="32-true", attention="eager",
                            batch_size=8, seq_len=4096)
    plan = fit.suggest(config).plan
    assert plan is not None and not plan.changes_training and not plan.more_hardware
    assert plan.config.lora_rank == 0 and plan.config.optimizer == "adamw"
    assert config.batch_size % plan.config.batch_size == 0  # gradient accumulation keeps the effective batch
    assert_minimal(config, plan)


def test_suggest_full_fine_tuning_of_8b_on_a_48gb_card_with_more_gpus_as_the_alternative():
    # (On 24 GB cards no GPU count fits full fine-tuning: FSDP2 keeps the root group, the fp32 embedding and
    # head, gathered through forward and backward, as traced in docs/accuracy-parallel.md.)
    # One 48 GB card: torchtune's single-device recipe, bf16 weights, 8-bit AdamW and the optimizer stepped in
    # backward (no full set of gradients), before adapters.
    config = TrainingConfig(model="llama-3.1-8b", gpu="rtx-a6000")
    suggestion = fit.suggest(config)
    plan = suggestion.plan
    assert plan.config.lora_rank == 0 and plan.config.optimizer_in_backward and plan.config.gpus == 1
    assert plan.config.optimizer == "adamw-8bit" and plan.config.precision == "bf16-true"
    assert_minimal(config, plan)
    # Full fine-tuning as configured needs more 48 GB cards: that is the alternative offered.
    (alternative,) = suggestion.alternatives
    assert alternative.config.lora_rank == 0 and alternative.config.gpus > 1 and estimate(alternative.config).fits


def test_suggest_puts_lora_adapters_in_the_compute_dtype_where_that_fits():
    # peft's fp32 adapters cast each adapted layer's input to fp32 and keep it for backward; bf16 adapters fit,
    # and cost no recompute, so they come before selective checkpointing (the same cost).
    config = TrainingConfig(model="llama-3.2-3b", gpu="rtx-4090", seq_len=3072, precision="bf16-true",
                            lora_rank=16, lora_targets="all-linear")
    plan = fit.suggest(config).plan
    assert plan.flags == "--lora-dtype compute" and plan.summary == "LoRA adapters in bf16"
    assert not plan.more_hardware
    assert_minimal(config, plan)
    # Autocast over fp32 weights keeps the adapters in fp32 either way: not offered there.
    mixed = fit.suggest(config.model_copy(update={"precision": "bf16-mixed"})).plan
    assert mixed is not None and mixed.config.lora_dtype == "fp32"


def test_suggest_says_when_nothing_fits():
    suggestion = fit.suggest(TrainingConfig(model="llama-3.1-405b", gpu="gtx-1080-ti", seq_len=8192))
    assert not suggestion.fits and suggestion.plan is None
    assert suggestion.message.startswith("nothing fits")


def test_answers_hold_on_a_sample_of_presets():
    """Property check over models x GPUs x options: boundaries exact, plans minimal."""
    rng = random.Random(7)
    model_ids, gpu_ids = list(models()), list(gpus())
    checked = 0
    while checked < 24:
        options = dict(
            model=rng.choice(model_ids), gpu=rng.choice(gpu_ids),
            precision=rng.choice(["32-true", "bf16-mixed", "bf16-true"]),
            checkpointing=rng.choice(["none", "selective", "full"]), attention=rng.choice(["eager", "flash"]),
            optimizer=rng.choice(["adamw", "adamw-8bit", "sgd", "adafactor"]),
            batch_size=rng.choice([1, 2, 4, 6]), seq_len=rng.choice([512, 1024, 2048]),
            gpus=rng.choice([1, 2, 8]), zero=rng.choice([0, 1, 3]),
        )
        config = TrainingConfig(**options)
        try:
            estimate(config)
        except InputError:
            continue
        checked += 1
        batch = fit.max_batch_size(config)
        if batch.fits:
            assert fits(config, batch_size=batch.batch_size)
        assert batch.at_least or not fits(config, batch_size=batch.batch_size + 1)
        seq = fit.max_seq_len(config, multiple_of=64)
        if seq.fits:
            assert fits(config, seq_len=seq.seq_len)
        if seq.limited_by == "memory":
            assert not fits(config, seq_len=seq.seq_len + 64)
        ranks = fit.min_gpus(config, zero=3)
        group = config.tp * config.pp
        if ranks.fits:
            assert fits(config, gpus=ranks.gpus, zero=3)
            assert ranks.gpus == group or not fits(config, gpus=ranks.gpus - group, zero=3)
        suggestion = fit.suggest(config)
        assert suggestion.fits_already == estimate(config).fits
        if suggestion.plan is not None:
            assert_minimal(config, suggestion.plan)


def test_queries_cost_a_handful_of_estimates():
    """Deterministic speed guard (the benchmark reports real timings): counted estimates, not seconds."""
    config = TrainingConfig(model="llama-3.2-1b", gpu="rtx-4090", attention="eager")
    assert fit.max_batch_size(config).estimates <= 20
    assert fit.max_seq_len(config).estimates <= 30
    assert fit.min_gpus(TrainingConfig(model="llama-3.1-8b", gpu="rtx-4090")).estimates <= 20
    assert fit.suggest(TrainingConfig(model="llama-3.1-70b", gpu="rtx-4090")).estimates <= 150


def test_suggest_is_fast_enough_even_on_slow_ci():
    config = TrainingConfig(model="llama-3.1-70b", gpu="rtx-4090", precision="32-true", attention="eager", batch_size=4)
    fit.suggest(config)
    start = time.perf_counter()
    fit.suggest(config)
    assert time.perf_counter() - start < 0.2  # the target is 10 ms; this only catches a lost search


# ---- CLI -------------------------------------------------------------------------


def test_fit_json_is_one_object_answering_all_four(capsys):
    code, out, err = run_cli(capsys, "fit", "--model", "llama-3.1-70b", "--gpu", "rtx-4090", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {"max_batch", "max_seq", "min_gpus", "suggest", "config", "device_peak_bytes"} <= set(data)
    assert data["max_batch"]["batch_size"] == 0
    assert data["min_gpus"]["zero"] == 3
    plan = data["suggest"]["plan"]
    assert plan["config"]["quant"] == "nf4" and plan["budget"]["fits"] is True
    assert all({"title", "reason", "changes", "device_peak_bytes"} == set(step) for step in plan["steps"])


def test_fit_json_answers_only_what_was_asked(capsys):
    code, out, _ = run_cli(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--max-batch", "--min-gpus",
                           "--zero-for-gpus", "2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["max_seq"] is None and data["suggest"] is None
    assert data["max_batch"]["batch_size"] >= 1 and data["min_gpus"]["zero"] == 2


def test_fit_table_names_every_question(capsys):
    code, out, _ = run_cli(capsys, "fit", "--model", "llama-3.1-8b", "--gpu", "rtx-4090")
    assert code == 0
    for text in ("Largest micro-batch", "Longest sequence", "Fewest GPUs (ZeRO-3)", "To make it fit", "LoRA", "try: memtui estimate"):
        assert text in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--zero-for-gpus", "4"], "--zero-for-gpus: '4' is not a valid choice (allowed: 0, 1, 2, 3)"),
        (["--seq-multiple", "0"], "--seq-multiple: must be at least 1"),
        (["--max-seq", "--seq-multiple", "2000000"], "--seq-multiple: 2000000 is longer than"),
        (["--model", "gpt2", "--seq-len", "4096"], "--seq-len: gpt2 has 1024 learned positions"),
        (["--min-gpus", "--zero", "3", "--gpus", "2", "--offload", "optimizer+params", "--zero-for-gpus", "1"],
         "--zero-for-gpus: --offload optimizer+params needs ZeRO-3"),
        (["--gpu", "a100"], "--gpu: unknown GPU 'a100'"),
        (["--suggest", "--margin", "100"], "--margin: 100 is not a percentage to leave free (allowed: 0 to under 100)"),
        (["--suggest", "--margin", "five"], "--margin: 'five' is not a number"),
        (["--max-batch", "--precision", "fp8"], "--precision: 'fp8' is not a valid choice"),
    ],
)
def test_fit_bad_input_is_one_line_exit_2(capsys, argv, expected):
    code, out, err = run_cli(capsys, "fit", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtui: error: ")
    assert expected in lines[0]


def test_fit_does_not_import_torch():
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from memtui.cli import main; code = main(sys.argv[1:]); "
         "assert 'torch' not in sys.modules, 'fit imported torch'; sys.exit(code)",
         "fit", "--model", "gpt2", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["config"]["model"] == "gpt2"
