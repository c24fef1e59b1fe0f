"""The local device a live run trains on, described for sizing and for the estimator.

The parent process (CLI, TUI) asks NVML and psutil, never torch; the worker asks
torch once CUDA is up, which is authoritative (free memory after its own context).
A CPU run is described as a GpuSpec too, so the estimator can predict it: its
memory is the RAM available now.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from memtui.engine.model.specs import GpuSpec
from memtui.engine.telemetry import host
from memtui.engine.telemetry.nvml import probe

DeviceKind = Literal["cpu", "cuda"]
DEVICE_CHOICES = ("auto", "cpu", "cuda")
CPU_LABEL = "CPU RSS"
NVML_LABEL = "NVML"


@dataclass(frozen=True)
class LocalDevice:
    kind: DeviceKind
    name: str
    memory_bytes: int  # what the device holds in all (RAM total on CPU)
    free_bytes: int  # what a run could use now
    compute_capability: str = "0.0"
    bf16: bool = True
    index: int = 0
    driver_version: str | None = None
    nvml: bool = False
    nvml_reason: str = ""

    @property
    def label(self) -> str:
        """How the device-level measurement is labelled in every front end."""
        return CPU_LABEL if self.kind == "cpu" else (NVML_LABEL if self.nvml else "torch reserved + context")

    def gpu_spec(self) -> GpuSpec:
        """The device as the estimator's GpuSpec (capacity = what is free now on CPU)."""
        slug = re.sub(r"[^a-z0-9.\-]+", "-", self.name.lower()).strip("-.") or self.kind
        memory = self.free_bytes if self.kind == "cpu" else self.memory_bytes
        return GpuSpec(
            id=f"local-{self.kind}-{slug}"[:80].rstrip("-."),
            name=self.name,
            memory_bytes=max(memory, 1),
            bf16=self.bf16,
            fp8=False,
            compute_capability=self.compute_capability,
            note="the local device of a live run",
        )

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["label"] = self.label
        return data


def cpu_device() -> LocalDevice:
    return LocalDevice(
        kind="cpu", name=f"CPU ({host.cpu_name()})", memory_bytes=host.total_memory_bytes(),
        free_bytes=host.available_memory_bytes(), nvml=False, nvml_reason="CPU run: no NVML",
    )


def visible_cuda_index(index: int = 0) -> int:
    """NVML's index of CUDA device `index` when CUDA_VISIBLE_DEVICES lists plain indices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return index
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if index < len(entries) and entries[index].isdigit():
        return int(entries[index])
    return index


def cuda_device_from_nvml(index: int = 0) -> tuple[LocalDevice | None, str]:
    """The GPU as NVML sees it, or (None, why not) where NVML cannot say."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None, "CUDA_VISIBLE_DEVICES hides every GPU"
    device, reading, reason = probe(visible_cuda_index(index))
    if device is None:
        return None, reason
    total = reading.total or device.memory_total
    if total is None or reading.free is None:
        return None, "NVML does not report this device's memory (MIG or vGPU?)"
    capability = device.compute_capability or "8.0"
    return LocalDevice(
        kind="cuda", name=device.name or f"CUDA device {index}", memory_bytes=total, free_bytes=reading.free,
        compute_capability=capability, bf16=int(capability.split(".")[0]) >= 8, index=index,
        driver_version=device.driver_version, nvml=True,
    ), ""


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
