"""--fsdp-param-dtype compute: FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), as torchtitan
applies it, traced (the policy on the fake process group, no autocast) and estimated alike."""

from __future__ import annotations

import json

import pytest

from memtui.cli import main
from memtui.engine.estimator import estimate
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace_parallel import config, tiny_llama

SPEC = tiny_llama(layers=4)


@pytest.mark.parametrize("zero", [2, 3])
def test_the_estimate_is_the_trace_of_fsdp2_casting_to_bf16(zero):
    from memtui.engine.trace import trace

    training = config(gpus=4, zero=zero, fsdp_param_dtype="compute")
    traced = trace(training, model=SPEC)
    assert any("param_dtype=bfloat16, reduce_dtype=float32" in line for line in traced.traced)
    estimated = estimate(training, model=SPEC)
    assert estimated.tensor_peak_bytes == pytest.approx(traced.budget.tensor_peak_bytes, rel=0.002)
    stored = trace(config(gpus=4, zero=zero), model=SPEC)
    # bf16 layers and activations, fp32 shards and states: less than autocast over fp32 gathered layers
    assert traced.budget.tensor_peak_bytes < stored.budget.tensor_peak_bytes
    assert traced.budget.model_states == stored.budget.model_states


def test_compute_outside_fsdp2_changes_nothing_and_says_so(capsys):
    code = main(["estimate", "--model", "llama-3.2-1b", "--gpus", "8", "--zero", "1", "--fsdp-param-dtype", "compute",
                 "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert any(note.startswith("--fsdp-param-dtype compute is modelled for") for note in data["notes"])
    as_stored = estimate(TrainingConfig(model="llama-3.2-1b", gpus=8, zero=1))
    assert data["tensor_peak_bytes"] == as_stored.tensor_peak_bytes


def test_a_bad_value_names_the_flag(capsys):
    from tests.test_cli import run_cli

    code, _out, error = run_cli(capsys, "estimate", "--fsdp-param-dtype", "bf16")
    assert code == 2
    assert "--fsdp-param-dtype" in error and "stored" in error and "compute" in error


def test_torchtitan_casts_under_fsdp_and_autocasts_on_one_gpu():
    from memtui.engine.model.stacks import stack_defaults

    sharded, _notes = stack_defaults("torchtitan", {"model": "llama-3.1-8b", "gpus": 8})
    assert sharded["zero"] == 3 and sharded["fsdp_param_dtype"] == "compute"
    alone, _notes = stack_defaults("torchtitan", {"model": "llama-3.1-8b"})
    assert "fsdp_param_dtype" not in alone
