"""Local GPU detection: NVML absent or failing gives None; recorded readings match the right preset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from memtui.engine.telemetry.local_gpu import detect_local_gpu, local_gpu_from_reading, match_preset
from memtui.engine.model.presets import gpus


class NVMLError(Exception):
    pass


class FakeNvml:
    """Stands in for the pynvml module: replays one reading, records init/shutdown."""

    def __init__(self, name, total, *, count=1, capability=(9, 0), fail_on=None):
        self.name, self.total, self.count, self.capability = name, total, count, capability
        self.fail_on = fail_on
        self.calls: list[str] = []

    def _call(self, what):
        self.calls.append(what)
        if what == self.fail_on:
            raise NVMLError(what)

    def nvmlInit(self):
        self._call("init")

    def nvmlShutdown(self):
        self._call("shutdown")

    def nvmlDeviceGetCount(self):
        self._call("count")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("handle")
        return index

    def nvmlDeviceGetName(self, handle):
        self._call("name")
        return self.name

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._call("memory")
        return SimpleNamespace(total=self.total, used=0, free=self.total)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        self._call("capability")
        return self.capability


# (NVML device name, memory.total in bytes) -> the preset it is.
READINGS = [
    ("NVIDIA H100 80GB HBM3", 85520809984, "h100-80gb"),
    ("NVIDIA H100 PCIe", 85520809984, "h100-80gb"),
    ("NVIDIA A100-SXM4-40GB", 42949672960, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 85899345920, "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", 85899345920, "a100-80gb"),
    ("NVIDIA A10", 24146608128, "a10"),
    ("NVIDIA GeForce RTX 4090", 25757220864, "rtx-4090"),
    ("NVIDIA GeForce RTX 3090", 25769803776, "rtx-3090"),
    ("NVIDIA GeForce RTX 5090", 34190917632, "rtx-5090"),
    ("NVIDIA GeForce GTX 1080 Ti", 11811160064, "gtx-1080-ti"),
    ("Tesla T4", 16106127360, "t4"),
    ("NVIDIA L4", 24152899584, "l4"),
    ("NVIDIA L40S", 48305799168, "l40s"),
    ("NVIDIA RTX A6000", 51527024640, "rtx-a6000"),
    ("Tesla V100-SXM2-16GB", 17179869184, "v100-16gb"),
    ("Tesla V100-SXM2-32GB", 34359738368, "v100-32gb"),
    ("NVIDIA H200", 150754820096, "h200-141gb"),
    ("NVIDIA B200", 192265846784, "b200-180gb"),
]


@pytest.mark.parametrize(("name", "total", "preset_id"), READINGS)
def test_recorded_readings_match_their_preset(name, total, preset_id):
    assert match_preset(name, total, gpus()).id == preset_id


def test_no_false_friends():
    presets = gpus()
    assert match_preset("NVIDIA RTX 6000 Ada Generation", 51527024640, presets) is None
    assert match_preset("NVIDIA L40", 48305799168, presets) is None  # not the L4, not the L40S
    assert match_preset("AMD Instinct MI300X", 206141652992, presets) is None


def test_the_real_capacity_replaces_the_presets():
    # An H100 NVL reports 94 GB: still the H100 family, but its own memory is the budget.
    local = local_gpu_from_reading("NVIDIA H100 NVL", 100485038080, device_count=2)
    assert local.preset_id == "h100-80gb"
    assert local.spec.id == "h100-80gb"
    assert local.spec.memory_bytes == 100485038080
    assert local.spec.bf16 is True
    assert local.device_count == 2
    assert "NVIDIA H100 NVL" in local.label


def test_an_unknown_gpu_still_plans_with_what_nvml_says():
    local = local_gpu_from_reading("NVIDIA RTX 6000 Ada Generation", 51527024640, compute_capability=(8, 9))
    assert local.preset_id is None
    assert local.spec.id == "local"
    assert local.spec.memory_bytes == 51527024640
    assert local.spec.bf16 is True and local.spec.fp8 is True
    old = local_gpu_from_reading("Quadro P6000", 25769803776, compute_capability=(6, 1))
    assert old.spec.bf16 is False


def test_detect_reads_device_zero_and_always_shuts_nvml_down():
    nvml = FakeNvml("NVIDIA GeForce RTX 4090", 25757220864, count=4, capability=(8, 9))
    local = detect_local_gpu(nvml)
    assert local is not None
    assert local.preset_id == "rtx-4090" and local.spec.memory_bytes == 25757220864
    assert local.device_count == 4
    assert nvml.calls[0] == "init" and nvml.calls[-1] == "shutdown"


def test_old_bindings_that_return_bytes_names():
    nvml = FakeNvml(b"Tesla T4", 16106127360, capability=(7, 5))
    assert detect_local_gpu(nvml).preset_id == "t4"


@pytest.mark.parametrize("fail_on", ["init", "count", "handle", "name", "memory"])
def test_any_nvml_failure_means_no_gpu_not_a_crash(fail_on):
    nvml = FakeNvml("NVIDIA H100 80GB HBM3", 85520809984, fail_on=fail_on)
    assert detect_local_gpu(nvml) is None
    if fail_on != "init":
        assert nvml.calls[-1] == "shutdown"


def test_a_missing_capability_call_is_not_fatal():
    nvml = FakeNvml("NVIDIA A10", 24146608128, fail_on="capability")
    assert detect_local_gpu(nvml).preset_id == "a10"


def test_no_devices_means_none():
    assert detect_local_gpu(FakeNvml("x", 1, count=0)) is None


def test_a_module_without_nvml_functions_means_none():
    assert detect_local_gpu(SimpleNamespace()) is None


def test_this_machine_never_raises():
    """No GPU in CI: NVML's library is missing, so the real call answers None (or a GPU where there is one)."""
    result = detect_local_gpu()
    assert result is None or result.spec.memory_bytes > 0


def test_the_planners_gpu_is_the_live_runs_device_type_read_once():
    from memtui.engine.live.devices import LocalDevice

    nvml = FakeNvml("NVIDIA L4", 24152899584, count=2, capability=(8, 9))
    local = detect_local_gpu(nvml)
    assert isinstance(local.device, LocalDevice) and local.device.kind == "cuda"
    assert (local.device.name, local.device.memory_bytes, local.device.device_count) == ("NVIDIA L4", 24152899584, 2)
    assert local.device.compute_capability == "8.9" and local.device_count == 2
    assert nvml.calls.count("init") == 1 and nvml.calls.count("shutdown") == 1
