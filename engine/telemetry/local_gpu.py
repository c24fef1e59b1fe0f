"""Find this machine's GPU through NVML and match it to a GPU preset.

The planner starts on the local GPU when there is one, with its real
capacity (NVML memory.total, what nvidia-smi shows as total), not the
preset's. Everything here is best effort: no driver, no NVML library, a
permission error or a GPU we have never heard of all end in None or an
unmatched result, never in an exception. pynvml is imported only inside
detect_local_gpu(), so importing this module costs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from memtui.engine.model.specs import GpuSpec

# Words in NVML names that say nothing about which GPU it is.
_NOISE_TOKENS = {"nvidia", "geforce", "tesla", "quadro"}


@dataclass(frozen=True)
class LocalGpu:
    """The first GPU NVML reports, as the planner should use it."""

    spec: GpuSpec  # the matched preset with the real memory.total, or a spec built from NVML alone
    nvml_name: str
    memory_total: int
    preset_id: str | None  # None when no preset matched
    device_count: int

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


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _read_first_device(nvml: Any) -> tuple[str, int, tuple[int, int] | None, int] | None:
    count = nvml.nvmlDeviceGetCount()
    if count < 1:
        return None
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    name = _text(nvml.nvmlDeviceGetName(handle)).strip()
    total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability: tuple[int, int] | None = (int(major), int(minor))
    except Exception:  # older drivers lack the call; the preset knows it anyway
        capability = None
    return name, total, capability, int(count)


def local_gpu_from_reading(
    nvml_name: str,
    memory_total: int,
    *,
    compute_capability: tuple[int, int] | None = None,
    device_count: int = 1,
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
    return LocalGpu(
        spec=spec,
        nvml_name=nvml_name,
        memory_total=memory_total,
        preset_id=preset.id if preset is not None else None,
        device_count=device_count,
    )


def detect_local_gpu(nvml: Any | None = None, presets: dict[str, GpuSpec] | None = None) -> LocalGpu | None:
    """The local GPU 0 via NVML, or None when there is none or NVML cannot tell. Never raises.

    `nvml` is the pynvml module (a stand-in in tests); it is imported here, not at module import.
    """
    try:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        reading = _read_first_device(nvml)
        if reading is None:
            return None
        name, total, capability, count = reading
        return local_gpu_from_reading(
            name, total, compute_capability=capability, device_count=count, presets=presets
        )
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


__all__ = ["LocalGpu", "detect_local_gpu", "local_gpu_from_reading", "match_preset"]
