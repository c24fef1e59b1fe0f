"""The local device a live run trains on, described for sizing and for the estimator.

The parent process (CLI, TUI) asks NVML (through telemetry.local_gpu, the one
reader) and psutil, never torch; the worker asks torch once CUDA is up, which is
authoritative (free memory after its own context). A CPU run is described as a
GpuSpec too, so the estimator can predict it: its memory is the RAM available now.
"""

from __future__ import annotations

from memtui.engine.telemetry import host
from memtui.engine.telemetry.local_gpu import (
    CPU_LABEL,
    NVML_LABEL,
    DeviceKind,
    LocalDevice,
    cuda_device_from_nvml,
    visible_cuda_index,
)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
__all__ = ["CPU_LABEL", "DEVICE_CHOICES", "NVML_LABEL", "DeviceKind", "LocalDevice", "cpu_device",
           "cuda_device_from_nvml", "detect", "visible_cuda_index"]


def cpu_device() -> LocalDevice:
    return LocalDevice(
        kind="cpu", name=f"CPU ({host.cpu_name()})", memory_bytes=host.total_memory_bytes(),
        free_bytes=host.available_memory_bytes(), nvml=False, nvml_reason="CPU run: no NVML",
    )


def detect(kind: str = "auto", index: int = 0) -> tuple[LocalDevice | None, str]:
    """(device, note) for `kind`; a CUDA device NVML cannot describe is (None, why): the worker decides."""
    if kind == "cpu":
        return cpu_device(), ""
    device, reason = cuda_device_from_nvml(index)
    if kind == "cuda":
        return device, reason
    if device is not None:
        return device, ""
    return cpu_device(), f"no CUDA device found ({reason}); running on the CPU"
