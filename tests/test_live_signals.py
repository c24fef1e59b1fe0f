"""`memtui run` interrupted or piped into `head`: a --json stream always ends with its terminal record,
and a closed pipe ends the run quietly with exit 0. Tiny model, CPU, a few seconds each."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil
import pytest

from tests.test_live_worker import ROOT, TINY, assert_gone


@pytest.fixture(autouse=True)
def private_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUI_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("MEMTUI_NO_NVML", "1")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"])
def test_a_signal_to_memtui_run_json_ends_the_stream_with_a_cancelled_summary(signum):
    process = subprocess.Popen([sys.executable, "-m", "memtui", "run", *TINY, "--steps", "1000", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if json.loads(line)["type"] == "step":
                break
        children = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        process.send_signal(signum)
        rest, stderr = process.communicate(timeout=10)
        lines += rest.splitlines()
        assert process.returncode == 130, stderr
        last = json.loads(lines[-1])
        assert last["type"] == "summary" and last["result"] == "cancelled", lines[-3:]
        assert last["steps_completed"] >= 1 and last["error_pct"]["tensor_peak"] is None  # partial: no error
        assert "Traceback" not in stderr
        assert_gone(*children, within=1.0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_a_refusal_is_the_json_streams_last_record():
    result = subprocess.run([sys.executable, "-m", "memtui", "run", *TINY, "--quant", "nf4", "--lora-rank", "8", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["type"] == "refused" and "--quant" in last["reason"]
    assert result.stderr.strip().splitlines()[-1].startswith("memtui: error: --quant")


def test_bad_input_on_a_json_stream_is_a_refused_record_and_one_line():
    result = subprocess.run([sys.executable, "-m", "memtui", "run", *TINY, "--quant", "nf4", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "type": "refused", "reason": "--quant: nf4 freezes the base weights; set --lora-rank to train adapters "
                                     "(allowed: none, or int8/nf4 with --lora-rank > 0)"}
    assert result.stderr.strip().splitlines() == ["memtui: error: " + json.loads(result.stdout)["reason"]]


@pytest.mark.parametrize("json_stream", [False, True])
def test_a_closed_pipe_ends_the_run_quietly_with_exit_0(json_stream):
    command = [sys.executable, "-m", "memtui", "run", *TINY, "--steps", "2" if not json_stream else "1000"]
    process = subprocess.Popen(command + (["--json"] if json_stream else []), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=ROOT)
    try:
        if json_stream:
            assert process.stdout.readline()  # `| head -1`: one line read, then the reader is gone
        process.stdout.close()
        process.wait(60)
        stderr = process.stderr.read().decode()
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr
        assert not psutil.Process().children(recursive=True) or all(
            child.status() == psutil.STATUS_ZOMBIE for child in psutil.Process().children(recursive=True))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
