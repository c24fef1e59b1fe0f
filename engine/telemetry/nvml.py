"""NVML readings that never crash: every call is guarded and a failure reads as N/A (None).

NVML can be missing (no driver, macOS, CI), refuse a query (MIG slices, WSL,
vGPU report NOT_SUPPORTED for per-process memory), deny it (NO_PERMISSION) or
lose the GPU mid-run. A query that is unsupported once is not asked again
(as nvitop does), a transient failure is N/A for that reading only, and a lost
GPU turns the whole source off. Nothing here raises to the caller.

Per-process memory is NVML's `usedGpuMemory` for this run's PIDs; inside a
container NVML reports host PIDs, so it is N/A there and device `used` remains.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# NVML return codes (nvml.h); literal so this module works without pynvml installed.
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_GPU_IS_LOST = 15
_FUNCTION_NOT_FOUND = 13
_PERMANENT = {_NOT_SUPPORTED, _NO_PERMISSION, _FUNCTION_NOT_FOUND}

DISABLE_ENV = "MEMTUI_NO_NVML"  # set to 1 to behave as if NVML were absent (tests, demos)


@dataclass(frozen=True)
class NvmlDevice:
    """What NVML says about the device, each field None where it would not say."""

    index: int
    name: str | None
    uuid: str | None
    driver_version: str | None
    memory_total: int | None
    compute_capability: str | None
    mig_mode: bool | None
    device_count: int | None = None  # devices NVML sees on this machine

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "uuid": self.uuid, "driver_version": self.driver_version,
            "memory_total": self.memory_total, "compute_capability": self.compute_capability, "mig_mode": self.mig_mode,
            "device_count": self.device_count,
        }


@dataclass(frozen=True)
class NvmlReading:
    """One reading: device memory (bytes) and the memory NVML attributes to each process."""

    used: int | None
    free: int | None
    total: int | None
    processes: tuple[tuple[int, int | None], ...] | None  # (pid, usedGpuMemory); None: query N/A

    def process_used(self, pids: Iterable[int]) -> int | None:
        """Bytes NVML attributes to `pids`; None when it reports none of them (or cannot)."""
        if self.processes is None:
            return None
        wanted = set(pids)
        values = [used for pid, used in self.processes if pid in wanted and used is not None]
        return sum(values) if values else None


_EMPTY = NvmlReading(used=None, free=None, total=None, processes=None)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """One NVML session on one device, chosen by UUID (CUDA's view) or by NVML index."""

    def __init__(self, *, index: int = 0, uuid: str | None = None, module: ModuleType | Any | None = None) -> None:
        self.index = index
        self.uuid = uuid
        self._module = module
        self._handle: Any = None
        self._unsupported: set[str] = set()
        self.available = False
        self.reason = "not opened"

    # ---- life cycle ---------------------------------------------------------------
    def open(self) -> bool:
        """Initialise NVML; False (with `reason`) when it cannot be used here."""
        if self._module is None and os.environ.get(DISABLE_ENV) == "1":
            self.reason = f"NVML disabled ({DISABLE_ENV}=1)"
            return False
        if self._module is None:
            try:
                import pynvml
            except Exception as error:  # ImportError, or a broken install
                self.reason = f"nvidia-ml-py is not importable ({error.__class__.__name__})"
                return False
            self._module = pynvml
        try:
            self._module.nvmlInit()
        except Exception as error:
            self.reason = _init_failure(error)
            return False
        try:
            if self.uuid:
                self._handle = self._module.nvmlDeviceGetHandleByUUID(self.uuid)
            else:
                self._handle = self._module.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as error:
            self.reason = f"NVML has no device {self.uuid or self.index} ({_text(error)})"
            self._shutdown()
            return False
        self.available = True
        self.reason = ""
        return True

    def close(self) -> None:
        if self.available:
            self.available = False
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._module.nvmlShutdown()
        except Exception:
            pass  # already down, or the library went away: nothing left to release

    def __enter__(self) -> Nvml:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- guarded queries ----------------------------------------------------------
    def _call(self, name: str, *args: Any) -> Any:
        """module.name(*args), or None when NVML cannot answer; never raises."""
        if not self.available or name in self._unsupported:
            return None
        function = getattr(self._module, name, None)
        if function is None:
            self._unsupported.add(name)
            return None
        try:
            return function(*args)
        except Exception as error:
            code = getattr(error, "value", None)
            if code in _PERMANENT:
                self._unsupported.add(name)
            elif code == _GPU_IS_LOST:
                self.available = False
                self.reason = "GPU is lost"
            return None

    def device(self) -> NvmlDevice | None:
        if not self.available:
            return None
        handle = self._handle
        name = self._call("nvmlDeviceGetName", handle)
        uuid = self._call("nvmlDeviceGetUUID", handle)
        driver = self._call("nvmlSystemGetDriverVersion")
        memory = self._call("nvmlDeviceGetMemoryInfo", handle)
        capability = self._call("nvmlDeviceGetCudaComputeCapability", handle)
        mig = self._call("nvmlDeviceGetMigMode", handle)
        count = self._call("nvmlDeviceGetCount")
        return NvmlDevice(
            index=self.index,
            name=_text(name) if name is not None else None,
            uuid=_text(uuid) if uuid is not None else None,
            driver_version=_text(driver) if driver is not None else None,
            memory_total=int(memory.total) if memory is not None else None,
            compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
            mig_mode=bool(mig[0]) if mig else None,
            device_count=int(count) if count is not None else None,
        )

    def read(self) -> NvmlReading:
        """Device memory and per-process memory now; fields NVML would not give are None."""
        if not self.available:
            return _EMPTY
        memory = self._call("nvmlDeviceGetMemoryInfo", self._handle)
        processes = self._call("nvmlDeviceGetComputeRunningProcesses", self._handle)
        listed = None
        if processes is not None:
            listed = tuple(
                (int(process.pid), int(process.usedGpuMemory) if process.usedGpuMemory is not None else None)
                for process in processes
            )
        if memory is None:
            return NvmlReading(used=None, free=None, total=None, processes=listed)
        return NvmlReading(used=int(memory.used), free=int(memory.free), total=int(memory.total), processes=listed)


def _init_failure(error: Exception) -> str:
    name = error.__class__.__name__
    if "LibraryNotFound" in name:
        return "no NVIDIA driver (NVML library not found)"
    if "DriverNotLoaded" in name:
        return "NVIDIA driver not loaded"
    if "LibRmVersionMismatch" in name:
        return "NVIDIA driver/library version mismatch (reload the driver)"
    return f"NVML failed to start ({_text(error) or name})"


def probe(index: int = 0, module: ModuleType | Any | None = None) -> tuple[NvmlDevice | None, NvmlReading, str]:
    """One-shot: (device, reading, reason it is unavailable or '') without keeping NVML open.

    The one place outside a run that asks NVML about this machine (the planner's GPU,
    a live run's preflight); `module` stands in for pynvml in tests.
    """
    nvml = Nvml(index=index, module=module)
    if not nvml.open():
        return None, _EMPTY, nvml.reason
    try:
        return nvml.device(), nvml.read(), ""
    finally:
        nvml.close()
