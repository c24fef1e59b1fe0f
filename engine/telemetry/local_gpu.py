"""This machine's GPU: one type (LocalDevice), read through one NVML reader (nvml.probe).

The planner starts on the local GPU when there is one, with its real
capacity (NVML memory.total, what nvidia-smi shows as total), not the
preset's: a LocalGpu is the LocalDevice matched to a GPU preset. A live run
sizes itself on the LocalDevice (engine.live.devices adds the CPU).
Everything here is best effort: no driver, no NVML library, a permission
error or a GPU we have never heard of all end in None or an unmatched
result, never in an exception. pynvml is imported only when NVML is asked,
so importing this module costs nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from memtui.engine.model.specs import GpuSpec
from memtui.engine.telemetry.nvml import NvmlDevice, NvmlReading, probe

DeviceKind = Literal["cpu", "cuda"]
CPU_LABEL = "CPU RSS"
NVML_LABEL = "NVML"


@dataclass(frozen=True)
class LocalDevice:
    """A device of this machine: a GPU as NVML or torch sees it, or the CPU a live run trains on."""

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
    device_count: int | None = None  # GPUs NVML sees on this machine; None where it cannot say

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


def visible_cuda_index(index: int = 0) -> int:
    """NVML's index of CUDA device `index` when CUDA_VISIBLE_DEVICES lists plain indices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return index
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if index < len(entries) and entries[index].isdigit():
        return int(entries[index])
    return index


def _device_from_nvml(device: NvmlDevice, reading: NvmlReading, index: int) -> LocalDevice | None:
    total = reading.total or device.memory_total
    if total is None or reading.free is None:
        return None
    capability = device.compute_capability or "8.0"
    return LocalDevice(
        kind="cuda", name=device.name or f"CUDA device {index}", memory_bytes=total, free_bytes=reading.free,
        compute_capability=capability, bf16=int(capability.split(".")[0]) >= 8, index=index,
        driver_version=device.driver_version, nvml=True, device_count=device.device_count,
    )


def cuda_device_from_nvml(index: int = 0) -> tuple[LocalDevice | None, str]:
    """CUDA device `index` as NVML sees it, or (None, why not) where NVML cannot say."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None, "CUDA_VISIBLE_DEVICES hides every GPU"
    device, reading, reason = probe(visible_cuda_index(index))
    if device is None:
        return None, reason
    local = _device_from_nvml(device, reading, index)
    if local is None:
        return None, "NVML does not report this device's memory (MIG or vGPU?)"
    return local, ""


# Words in NVML names that say nothing about which GPU it is.
_NOISE_TOKENS = {"nvidia", "geforce", "tesla", "quadro"}


@dataclass(frozen=True)
class LocalGpu:
    """This machine's first GPU as the planner uses it: the device, matched to a GPU preset."""

    device: LocalDevice
    spec: GpuSpec  # the matched preset with the real memory.total, or a spec built from NVML alone
    preset_id: str | None  # None when no preset matched

    @property
    def nvml_name(self) -> str:
        return self.device.name

    @property
    def memory_total(self) -> int:
        return self.device.memory_bytes

    @property
    def device_count(self) -> int:
        return self.device.device_count or 1

    @property
    def label(self) -> str:
        return f"{self.nvml_name} (this machine)"


def _tokens(text: str) -> set[str]:
    return {token for token in re.split(r"[^a-z0-9]+", text.lower()) if token} - _NOISE_TOKENS


def _family_tokens(preset: GpuSpec) -> set[str]:
    """The tokens that identify a preset's GPU: its id without the memory size ('a100-80gb' -> {'a100'})."""
    return {token for token in preset.id.split("-") if not re.fullmatch(r"\d+gb", token)} - _NOISE_TOKENS


def match_preset(nvml_name: str, memory_bytes: int, presets: dict[str, GpuSpec]) -> GpuSpec | None:
    """The preset for an NVML device name; among same-family presets, the one closest in memory.

    'NVIDIA A100-SXM4-40GB' -> a100-40gb, 'NVIDIA GeForce RTX 4090' -> rtx-4090,
    'NVIDIA L40S' -> l40s (not l4), 'NVIDIA A100 80GB PCIe' -> a100-80gb (not a10).
    """
    name_tokens = _tokens(nvml_name)
    candidates = [preset for preset in presets.values() if _family_tokens(preset) <= name_tokens]
    if not candidates:
        return None
    # The most specific family wins (rtx-a6000 over a hypothetical a6000), then the nearest capacity.
    return min(candidates, key=lambda p: (-len(_family_tokens(p)), abs(p.memory_bytes - memory_bytes)))


def local_gpu_from_reading(
    nvml_name: str,
    memory_total: int,
    *,
    compute_capability: tuple[int, int] | None = None,
    device_count: int = 1,
    free_bytes: int | None = None,
    presets: dict[str, GpuSpec] | None = None,
) -> LocalGpu | None:
    """Turn one NVML reading into a LocalGpu (matched to a preset when one fits). None if unusable."""
    if memory_total <= 0 or not nvml_name:
        return None
    if presets is None:
        from memtui.engine.model.presets import gpus

        presets = gpus()
    preset = match_preset(nvml_name, memory_total, presets)
    if preset is not None:
        spec = preset.model_copy(update={"memory_bytes": memory_total, "note": f"NVML: {nvml_name}"})
    else:
        major, minor = compute_capability or (0, 0)
        spec = GpuSpec(
            id="local",
            name=nvml_name,
            memory_bytes=memory_total,
            bf16=major >= 8,
            fp8=(major, minor) >= (8, 9),
            compute_capability=f"{major}.{minor}",
            note="read from NVML; no preset matched",
        )
    device = LocalDevice(
        kind="cuda", name=nvml_name, memory_bytes=memory_total,
        free_bytes=memory_total if free_bytes is None else free_bytes, compute_capability=spec.compute_capability,
        bf16=spec.bf16, nvml=True, device_count=device_count,
    )
    return LocalGpu(device=device, spec=spec, preset_id=preset.id if preset is not None else None)


def detect_local_gpu(nvml: Any | None = None, presets: dict[str, GpuSpec] | None = None) -> LocalGpu | None:
    """The local GPU 0 via NVML, or None when there is none or NVML cannot tell. Never raises.

    `nvml` is the pynvml module (a stand-in in tests); it is imported only when asked.
    """
    try:
        device, reading, _reason = probe(0, module=nvml)
    except Exception:  # probe guards every NVML call; this is for a stand-in that misbehaves otherwise
        return None
    if device is None or not device.name or not device.memory_total or not device.device_count:
        return None
    capability = None
    if device.compute_capability:
        major, minor = device.compute_capability.split(".")
        capability = (int(major), int(minor))
    return local_gpu_from_reading(
        device.name.strip(), device.memory_total, compute_capability=capability, device_count=device.device_count,
        free_bytes=reading.free, presets=presets,
    )


__all__ = ["LocalDevice", "LocalGpu", "cuda_device_from_nvml", "detect_local_gpu", "local_gpu_from_reading",
           "match_preset", "visible_cuda_index"]
