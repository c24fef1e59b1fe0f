"""NVML: absent, refusing queries (MIG/WSL), losing the GPU: N/A everywhere, never an exception."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pynvml
import pytest

from memtui.engine.live import devices
from memtui.engine.telemetry.nvml import Nvml, probe
from memtui.engine.telemetry.sampler import SAMPLE_FIELDS, Sampler, nvml_source, rss_source


class FakeNvml:
    """A pynvml stand-in: one 80 GB device; `fail` maps a function name to the NVML error it raises."""

    NVMLError = pynvml.NVMLError

    def __init__(self, fail: dict[str, int] | None = None, init_error: int | None = None) -> None:
        self.fail = fail or {}
        self.init_error = init_error
        self.calls: dict[str, int] = {}
        self.used = 10 << 30

    def _enter(self, name: str):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise pynvml.NVMLError(self.fail[name])

    def nvmlInit(self):
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self._enter("nvmlShutdown")

    def nvmlDeviceGetHandleByIndex(self, index):
        self._enter("nvmlDeviceGetHandleByIndex")
        return object()

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._enter("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=80 << 30, free=(80 << 30) - self.used, used=self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._enter("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=111, usedGpuMemory=3 << 30), SimpleNamespace(pid=222, usedGpuMemory=None)]

    def nvmlDeviceGetName(self, handle):
        self._enter("nvmlDeviceGetName")
        return "NVIDIA A100-SXM4-80GB"

    def nvmlSystemGetDriverVersion(self):
        self._enter("nvmlSystemGetDriverVersion")
        return "550.54.15"


def test_nvml_absent_reads_as_not_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    nvml = Nvml()
    assert nvml.open() is False
    assert "not importable" in nvml.reason
    reading = nvml.read()
    assert (reading.used, reading.free, reading.total, reading.processes) == (None, None, None, None)
    assert reading.process_used([123]) is None
    assert nvml.device() is None
    nvml.close()  # closing what never opened is fine


def test_no_driver_gives_a_reason_not_a_crash():
    nvml = Nvml(module=FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert nvml.open() is False
    assert nvml.reason == "no NVIDIA driver (NVML library not found)"
    nvml = Nvml(module=FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert nvml.open() is False
    assert nvml.reason == "NVIDIA driver not loaded"


def test_this_machine_without_nvml_falls_back_to_cpu(monkeypatch):
    monkeypatch.setenv("MEMTUI_NO_NVML", "1")
    device, reading, reason = probe()
    assert device is None and reading.used is None and "disabled" in reason
    chosen, note = devices.detect("auto")
    assert chosen is not None and chosen.kind == "cpu" and chosen.label == "CPU RSS"
    assert "running on the CPU" in note
    assert devices.detect("cuda")[0] is None


def test_per_process_memory_unsupported_is_na_and_not_asked_again():
    fake = FakeNvml(fail={"nvmlDeviceGetComputeRunningProcesses": pynvml.NVML_ERROR_NOT_SUPPORTED})
    nvml = Nvml(module=fake)
    assert nvml.open()
    first, second = nvml.read(), nvml.read()
    assert first.used == 10 << 30 and first.processes is None and first.process_used([111]) is None
    assert second.used == 10 << 30
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 1  # cached as unsupported, like nvitop


def test_process_memory_sums_this_runs_pids_and_skips_unavailable_values():
    nvml = Nvml(module=FakeNvml())
    assert nvml.open()
    reading = nvml.read()
    assert reading.process_used([111]) == 3 << 30
    assert reading.process_used([222]) is None  # NVML_VALUE_NOT_AVAILABLE
    assert reading.process_used([999]) is None  # a container's PID namespace: not listed


def test_missing_functions_and_odd_failures_are_na():
    fake = FakeNvml(fail={"nvmlDeviceGetName": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})
    nvml = Nvml(module=fake)
    assert nvml.open()
    device = nvml.device()
    assert device is not None
    assert device.name is None and device.uuid is None and device.compute_capability is None  # not in FakeNvml
    assert device.driver_version == "550.54.15" and device.memory_total == 80 << 30


def test_gpu_lost_mid_run_turns_the_source_off():
    fake = FakeNvml()
    nvml = Nvml(module=fake)
    assert nvml.open() and nvml.read().used is not None
    fake.fail["nvmlDeviceGetMemoryInfo"] = pynvml.NVML_ERROR_GPU_IS_LOST
    assert nvml.read().used is None
    assert nvml.available is False and nvml.reason == "GPU is lost"
    assert nvml.read().used is None


def test_sampler_runs_at_20_hz_off_the_calling_thread_and_survives_a_failing_source():
    samples = []

    def broken():
        raise RuntimeError("a source failing must not stop sampling")

    nvml = Nvml(module=FakeNvml())
    nvml.open()
    sampler = Sampler([broken, rss_source(), nvml_source(nvml, lambda: [111])], samples.append, hz=20).start()
    time.sleep(1.0)
    sampler.stop()
    assert len(samples) >= 17  # 20 per second, with scheduling slack on a busy 2-core machine
    for sample in samples:
        assert sample["type"] == "sample"
        assert set(SAMPLE_FIELDS) <= set(sample)
        assert sample["rss"] > 0 and sample["nvml_used"] == 10 << 30 and sample["nvml_process"] == 3 << 30
        assert sample["allocated"] is None  # no tensor source here: N/A, not missing
    times = [sample["t"] for sample in samples]
    assert times == sorted(times)


def test_sampler_rejects_a_zero_rate():
    with pytest.raises(ValueError):
        Sampler([], lambda _s: None, hz=0)
