"""The CLI: one JSON object, one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memtui.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse exits for usage errors
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_estimate_json_is_one_object_with_the_schema(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--precision", "32-true", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data["model"]) == {"id", "params", "trainable_params"}
    assert set(data["gpu"]) == {"id", "memory_bytes"}
    assert set(data["model_states"]) == {"weights", "gradients", "optimizer_states"}
    assert set(data["per_gpu"]) == {"weights", "gradients", "optimizer_states", "activations", "temporary", "overhead"}
    for key in ("tensor_peak_bytes", "device_peak_bytes", "fits", "headroom_bytes", "bytes_per_param", "timeline", "config"):
        assert key in data
    assert data["config"]["precision"] == "32-true"
    assert all(set(point) == {"phase", "bytes"} for point in data["timeline"])
    # The acceptance check: 16 bytes/param of model states, and it does not fit.
    assert sum(data["model_states"].values()) == 16 * data["model"]["params"]
    assert data["fits"] is False


def test_estimate_table_names_verdict(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "gpt2", "--gpu", "rtx-4090")
    assert code == 0
    assert "fits" in out and "Optimizer states" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--precision", "fp8"], "--precision: 'fp8' is not a valid choice (allowed: 32-true"),
        (["--model", "llama-9b"], "--model: unknown model 'llama-9b'"),
        (["--gpu", "a100"], "--gpu: unknown GPU 'a100'"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--seq-len", "-5"], "--seq-len: must be at least 1"),
        (["--batch-size", "two"], "--batch-size: 'two' is not a whole number"),
        (["--tp", "3"], "--tp: 3 does not divide llama-3.1-8b's 32 attention heads (allowed: 1, 2, 4, 8, 16, 32)"),
        (["--lora-rank", "8192", "--lora-targets", "all-linear"], "--lora-rank: 8192 exceeds"),
        (["--lora-rank", "8", "--lora-targets", "qproj"], "--lora-targets: 'qproj' is not a linear layer"),
        (["--quant", "nf4"], "--quant: nf4 freezes the base weights"),
        (["--offload", "optimizer+params", "--zero", "2", "--gpus", "8"], "--offload: optimizer+params needs --zero 3"),
        (["--master-weights"], "--master-weights: needs 16-bit weights"),
        (["--recipe", "qlora"], "--recipe: unknown recipe 'qlora'"),
        (["--zero", "4"], "--zero: '4' is not a valid choice (allowed: 0, 1, 2, 3)"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, expected):
    code, out, err = run_cli(capsys, "estimate", *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memtui: error: ")
    assert expected in lines[0]
    assert "Traceback" not in err


def test_malformed_config_json_path(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64,')
    code, _, err = run_cli(capsys, "estimate", "--model", str(path))
    assert code == 2
    assert "malformed JSON" in err and str(path) in err
    assert len(err.strip().splitlines()) == 1


def test_recipe_then_flags_override(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "llama-3.1-8b", "--recipe", "qlora-24gb", "--lora-rank", "64", "--json")
    assert code == 0
    config = json.loads(out)["config"]
    assert config["quant"] == "nf4" and config["gpu"] == "rtx-4090" and config["lora_rank"] == 64


def test_presets_lists_everything(capsys):
    code, out, _ = run_cli(capsys, "presets", "--json")
    assert code == 0
    data = json.loads(out)
    assert {m["id"] for m in data["models"]} >= {"gpt2", "llama-3.1-405b", "mixtral-8x7b"}
    assert {g["id"] for g in data["gpus"]} >= {"h100-80gb", "rtx-4090"}
    assert {r["id"] for r in data["recipes"]} >= {"qlora-24gb"}


def test_console_script_runs_in_a_fresh_process():
    """The installed entry point, as a user types it (no torch import for estimate)."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from memtui.cli import main; code = main(sys.argv[1:]); "
         "assert 'torch' not in sys.modules, 'estimate imported torch'; sys.exit(code)",
         "estimate", "--model", "gpt2", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["id"] == "gpt2"


# A process that imported torch, then the installed script's entry: what it printed and its exit handlers survive
# the fast exit, and main()'s exit code is the process's.
FAST_EXIT_PROBE = """
import atexit, sys
import torch
atexit.register(lambda: print("exit handler ran", file=sys.stderr, flush=True))
sys.argv = ["memtui", *sys.argv[1:]]
from memtui.cli import entry
entry()
print("not reached", file=sys.stderr)
"""


@pytest.mark.parametrize(("argv", "code"), [(["presets", "--json"], 0), (["estimate", "--model", "nope"], 2)])
def test_entry_exits_fast_after_torch_with_output_and_exit_handlers(argv, code):
    result = subprocess.run([sys.executable, "-c", FAST_EXIT_PROBE, *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == code, result.stderr
    assert "exit handler ran" in result.stderr and "not reached" not in result.stderr
    if code == 0:
        assert {g["id"] for g in json.loads(result.stdout)["gpus"]} >= {"h100-80gb"}  # every byte, flushed
    else:
        assert "memtui: error: " in result.stderr and "nope" in result.stderr
