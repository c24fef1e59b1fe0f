"""Live runs for real, on the CPU, with a tiny scaled model: the stream, the result, and the life cycle.

Every test checks with psutil that no process of the run is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from memtui.engine.live.devices import cpu_device
from memtui.engine.live.lock import RunLock
from memtui.engine.live.plan import LiveOptions, make_plan
from memtui.engine.live.process import WorkerProcess
from memtui.engine.model.specs import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "llama-3.2-1b", "--device", "cpu", "--layers", "1", "--width", "128", "--vocab", "1024",
        "--seq-len", "64"]
TINY_OPTIONS = dict(device="cpu", layers=1, width=128, vocab=1024, seq_len=64)


@pytest.fixture(autouse=True)
def private_lock(tmp_path, monkeypatch):
    """Each test its own lock, so parallel test workers do not queue on the machine's."""
    monkeypatch.setenv("MEMTUI_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("MEMTUI_NO_NVML", "1")


def memtui(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtui", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=240, **kwargs)


def assert_gone(*pids: int, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    for pid in pids:
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"process {pid} is still running"
            time.sleep(0.05)


def test_json_stream_samples_phases_and_a_like_for_like_summary():
    result = memtui("run", *TINY, "--steps", "3", "--json")
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    samples = [m for m in messages if m["type"] == "sample"]
    assert len(samples) >= 10
    for sample in samples:
        assert {"t", "allocated", "reserved", "nvml_used", "rss"} <= sample.keys()
        assert sample["nvml_used"] is None and sample["reserved"] is None  # CPU run: N/A, not zero
    times = [s["t"] for s in samples]
    assert times == sorted(times)
    assert max(s["allocated"] or 0 for s in samples) > 0 and all(s["rss"] for s in samples)
    phases = [(m["step"], m["phase"]) for m in messages if m["type"] == "phase"]
    for step in (1, 2, 3):
        assert [p for s, p in phases if s == step][:4] == ["forward", "loss", "backward", "optimizer"]
    summary = messages[-1]
    assert summary["type"] == "summary" and summary["result"] == "completed" and summary["steps_completed"] == 3
    assert summary["device"]["kind"] == "cpu" and summary["measured"]["label"] == "CPU RSS"

    # The prediction is the estimator's for the scaled run exactly as run (computed here again).
    plan = make_plan(TrainingConfig(model="llama-3.2-1b"), LiveOptions(**TINY_OPTIONS, steps=3), cpu_device())
    assert summary["scaled_model"]["config"] == plan.config.model_dump(mode="json")
    assert summary["scaled_model"]["layers"] == 1 and summary["scaled_model"]["hidden_size"] == plan.spec.hidden_size
    predicted, measured = summary["predicted"], summary["measured"]
    assert predicted["tensor_peak_bytes"] == plan.predicted_tensor_peak
    assert predicted["device_peak_bytes"] == predicted["tensor_peak_bytes"] + predicted["adjustments"]["cpu_runtime_bytes"]
    assert abs(predicted["tensor_peak_bytes"] - measured["tensor_peak_bytes"]) <= 0.10 * measured["tensor_peak_bytes"]
    assert summary["error_pct"]["tensor_peak"] is not None
    assert set(measured["components"]) >= {"weights", "gradients", "optimizer_states"}
    full = summary["full_model"]
    assert full["id"] == "llama-3.2-1b" and full["analytic_tensor_peak_bytes"] > predicted["tensor_peak_bytes"]


# ZeRO-3 is run once, by tests/test_trace_parallel.py's byte-for-byte check, which asserts the same things.
@pytest.mark.parametrize(("zero", "checkpointing"), [(0, "none"), (2, "full")])
def test_two_gloo_ranks_measure_ddp_and_fsdp2_as_predicted(zero, checkpointing):
    """--gpus 2 on the CPU: two gloo processes (DDP for ZeRO-0, FSDP2 for ZeRO-2), rank 0 measured."""
    result = memtui("run", "--model", "llama-3.2-1b", "--device", "cpu", "--gpus", "2", "--zero", str(zero),
                    "--checkpointing", checkpointing, "--layers", "2", "--width", "256", "--vocab", "2048",
                    "--seq-len", "128", "--steps", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["result"] == "completed" and summary["scaled_model"]["ranks"] == 2
    predicted, measured = summary["predicted"]["tensor_peak_bytes"], summary["measured"]["tensor_peak_bytes"]
    assert abs(predicted - measured) <= 0.05 * measured, summary["error_pct"]
    sharded = summary["measured"]["components"]["optimizer_states"]
    single = make_plan(TrainingConfig(model="llama-3.2-1b", zero=zero, checkpointing=checkpointing),
                       LiveOptions(device="cpu", layers=2, width=256, vocab=2048, seq_len=128, steps=2), cpu_device())
    full_states = single.predicted_components["optimizer_states"]
    assert sharded == pytest.approx(full_states if zero == 0 else full_states / 2, rel=0.01)


def test_readable_output_and_oom_as_a_result():
    refused = memtui("run", *TINY, "--steps", "2", "--capacity", "0.001")
    assert refused.returncode == 2 and "add --force" in refused.stderr and len(refused.stderr.splitlines()) == 1
    result = memtui("run", *TINY, "--steps", "2", "--capacity", "0.005", "--force")
    assert result.returncode == 0, result.stderr
    assert "OOM at" in result.stdout and "after step 0" in result.stdout
    assert "Tensor peak" in result.stdout  # the predicted-vs-measured table


def test_bad_input_is_one_line_and_exit_2():
    result = memtui("run", "--device", "gpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--device" in result.stderr and "auto, cpu, cuda" in result.stderr
    result = memtui("run", "--model", "llama-3.2-1b", "--device", "cpu", "--quant", "nf4", "--lora-rank", "8")
    assert result.returncode == 2 and "--if-unsupported skip" in result.stderr


def test_cuda_asked_for_where_torch_has_none_is_refused_naming_the_flag():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = memtui("run", *TINY[:2], "--device", "cuda", "--steps", "1", "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("memtui: error: --device: cuda was asked for but torch sees no "
                                                      "CUDA device here (allowed: auto, cpu)")


def test_cancel_ends_the_worker_within_two_seconds_and_frees_the_lock():
    config = TrainingConfig(model="llama-3.2-1b")
    worker = WorkerProcess(config, LiveOptions(**TINY_OPTIONS, steps=1000), device_kind="cpu").start()
    try:
        seen = []
        for message in worker.messages():
            seen.append(message["type"])
            if message["type"] == "step":
                break  # training for real now
        assert "sample" in seen and "plan" in seen
        family = [p.pid for p in worker.descendants()]
        began = time.monotonic()
        worker.cancel()
        assert time.monotonic() - began < 2.0
        assert not worker.running()
        assert_gone(*family, within=0.5)
    finally:
        worker.close()
    RunLock().acquire().release()  # free for the next run


def test_second_run_is_refused_while_one_is_going():
    from memtui.engine.live.process import LiveRefused

    config = TrainingConfig(model="llama-3.2-1b")
    with WorkerProcess(config, LiveOptions(**TINY_OPTIONS, steps=1000), device_kind="cpu") as first:
        with pytest.raises(LiveRefused, match="another live run"):
            WorkerProcess(config, LiveOptions(**TINY_OPTIONS), device_kind="cpu").start()
        pid = first.pid
    assert_gone(pid)


def test_worker_dies_with_its_parent():
    """The parent is SIGKILLed (as a lost SSH session would be): the worker notices and exits."""
    code = (
        "from memtui.engine.live.process import WorkerProcess; from memtui.engine.live.plan import LiveOptions;"
        "from memtui.engine.model.specs import TrainingConfig;"
        f"w = WorkerProcess(TrainingConfig(model='llama-3.2-1b'), LiveOptions(**{TINY_OPTIONS!r}, steps=1000),"
        " device_kind='cpu').start(); print(w.pid, flush=True); import time; time.sleep(120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        worker_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(worker_pid)
        time.sleep(0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert_gone(worker_pid, within=3.0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)


def test_sigterm_to_memtui_run_leaves_nothing_behind():
    process = subprocess.Popen([sys.executable, "-m", "memtui", "run", *TINY, "--steps", "1000", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in process.stdout:
            if json.loads(line)["type"] == "sample":
                break
        children = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        assert children
        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 130
        assert_gone(*children, within=1.0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_the_worker_trains_at_a_lower_priority_than_the_app():
    config = TrainingConfig(model="llama-3.2-1b")
    with WorkerProcess(config, LiveOptions(**TINY_OPTIONS, steps=1000), device_kind="cpu") as worker:
        hello = next(worker.messages())
        assert hello["type"] == "hello"
        assert psutil.Process(worker.pid).nice() >= min(19, psutil.Process().nice() + 10)
