"""Record NVML readings to JSON lines, and replay a recording through the live code path.

Format (memtui-nvml-stream, version 1), one JSON object per line:

    {"format": "memtui-nvml-stream", "version": 1, "synthetic": false, "source": "...",
     "recorded_at": "2026-01-01T00:00:00+00:00", "hz": 20, "pids": [4242],
     "device": {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-...", "driver_version": "550.54.15",
                "memory_total": 85520809984, "compute_capability": "9.0", "mig_mode": false}}
    {"t": 0.05, "memory": {"total": 85520809984, "free": 84904247296, "used": 616562688},
     "processes": [{"pid": 4242, "usedGpuMemory": 524288000}]}
    ...

`memory` holds nvmlDeviceGetMemoryInfo's fields (nvmlMemory_t: total, free, used, in
bytes) and `processes` nvmlDeviceGetComputeRunningProcesses' (pid, usedGpuMemory in
bytes, null where NVML reports NVML_VALUE_NOT_AVAILABLE). A query NVML refused is
recorded as null: null in every record replays as NOT_SUPPORTED (MIG, WSL), null in
some records as a transient failure of that reading.
`ReplayNvml` stands in for the pynvml module, so a replay runs the very `Nvml`
reader, sampler source and `SampleSeries` a live run uses.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from memtui.engine.telemetry.nvml import Nvml, NvmlDevice, NvmlReading
from memtui.engine.telemetry.sampler import SAMPLE_FIELDS, nvml_source

FORMAT = "memtui-nvml-stream"
VERSION = 1
_NOT_SUPPORTED = 3
_UNKNOWN = 999  # NVML_ERROR_UNKNOWN: a transient failure


class NvmlRecorder:
    """Appends each reading as one line; the header names the device and the run's PIDs."""

    def __init__(self, path: str | Path, *, device: NvmlDevice | None, pids: Sequence[int], started: float,
                 hz: float, source: str = "memtui run", synthetic: bool = False) -> None:
        self.path = Path(path)
        self.started = started
        self._file = self.path.open("w", encoding="utf-8")
        header = {
            "format": FORMAT, "version": VERSION, "synthetic": synthetic, "source": source,
            "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "hz": hz, "pids": list(pids), "device": device.as_json() if device else None,
        }
        self._write(header)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def record(self, monotonic: float, reading: NvmlReading) -> None:
        memory = None
        if reading.used is not None:
            memory = {"total": reading.total, "free": reading.free, "used": reading.used}
        processes = None
        if reading.processes is not None:
            processes = [{"pid": pid, "usedGpuMemory": used} for pid, used in reading.processes]
        self._write({"t": round(monotonic - self.started, 4), "memory": memory, "processes": processes})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_recording(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records); raises ValueError naming the line for anything malformed."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty recording")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:1: {error.msg}") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}:1: not a {FORMAT} v{VERSION} header")
    records = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: {error.msg}") from None
        if "t" not in record:
            raise ValueError(f"{path}:{number}: record without t")
        records.append(record)
    return header, records


def _error_classes() -> tuple[type[Exception], Any]:
    try:
        import pynvml

        return pynvml.NVMLError, pynvml
    except Exception:  # pragma: no cover - nvidia-ml-py is a dependency
        class NVMLError(Exception):
            def __init__(self, value: int) -> None:
                super().__init__(value)
                self.value = value

        return NVMLError, None


class ReplayNvml:
    """A pynvml stand-in serving a recording, one record per `advance()`.

    The replay loop advances the clock, not the reader's queries: the reader stops
    asking a query NVML refused, so a clock driven by a query could stop forever.
    A field null in every record replays as NOT_SUPPORTED (what MIG and WSL answer,
    and the reader stops asking); a field null only in some records replays as a
    transient failure (NVML_ERROR_UNKNOWN), N/A for that reading only.
    """

    def __init__(self, path: str | Path) -> None:
        self.header, self.records = read_recording(path)
        self.NVMLError, _ = _error_classes()
        self.position = -1
        self.initialised = False
        self._never = {key for key in ("memory", "processes")
                       if all(record.get(key) is None for record in self.records)}

    @property
    def exhausted(self) -> bool:
        return self.position + 1 >= len(self.records)

    def advance(self) -> bool:
        """Move to the next record; False when the recording has ended."""
        if self.exhausted:
            return False
        self.position += 1
        return True

    @property
    def current_t(self) -> float:
        return float(self.records[self.position]["t"]) if self.position >= 0 else 0.0

    def _not_supported(self) -> Exception:
        return self.NVMLError(_NOT_SUPPORTED)

    def _field(self, key: str) -> Any:
        if self.position < 0:
            raise self.NVMLError(_UNKNOWN)  # before the first record: nothing was read yet
        value = self.records[self.position].get(key)
        if value is None:
            raise self._not_supported() if key in self._never else self.NVMLError(_UNKNOWN)
        return value

    def _device(self, key: str) -> Any:
        device = self.header.get("device") or {}
        value = device.get(key)
        if value is None:
            raise self._not_supported()
        return value

    # ---- the pynvml functions memtui calls --------------------------------------------
    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"replay:{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return f"replay:{uuid}"

    def nvmlDeviceGetName(self, _handle: Any) -> str:
        return self._device("name")

    def nvmlDeviceGetUUID(self, _handle: Any) -> str:
        return self._device("uuid")

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._device("driver_version")

    def nvmlDeviceGetCudaComputeCapability(self, _handle: Any) -> tuple[int, int]:
        major, minor = str(self._device("compute_capability")).split(".")
        return int(major), int(minor)

    def nvmlDeviceGetMigMode(self, _handle: Any) -> tuple[int, int]:
        mode = int(bool(self._device("mig_mode")))
        return mode, mode

    def nvmlDeviceGetMemoryInfo(self, _handle: Any) -> SimpleNamespace:
        memory = self._field("memory")
        return SimpleNamespace(total=memory["total"], free=memory["free"], used=memory["used"])

    def nvmlDeviceGetComputeRunningProcesses(self, _handle: Any) -> list[SimpleNamespace]:
        processes = self._field("processes")
        return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p.get("usedGpuMemory")) for p in processes]


def replay_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples a live run would have emitted for this recording (NVML fields only), one per record."""
    module = ReplayNvml(path)
    nvml = Nvml(module=module)
    if not nvml.open():
        return
    pids = list(module.header.get("pids") or [])
    read = nvml_source(nvml, lambda: pids)
    try:
        while module.advance():
            fields = read()
            sample: dict[str, Any] = {"type": "sample", "t": module.current_t}
            sample.update(dict.fromkeys(SAMPLE_FIELDS))
            sample.update(fields)
            yield sample
    finally:
        nvml.close()


def replay_device(path: str | Path) -> NvmlDevice | None:
    nvml = Nvml(module=ReplayNvml(path))
    if not nvml.open():
        return None
    try:
        return nvml.device()
    finally:
        nvml.close()
