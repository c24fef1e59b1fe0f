"""Generate the synthetic NVML stream fixtures (not from a real GPU; labelled as such in their headers).

    uv run python tests/data/make_synthetic_nvml.py

The shape follows what NVML shows for a 3-step bf16 run on one H100 80GB HBM3:
device `used` at idle, the process appearing in nvmlDeviceGetComputeRunningProcesses
when its CUDA context is created (about 500 MiB on Hopper), then the caching
allocator's reserved memory climbing in 2 MiB / 20 MiB segments during the first
step and staying flat afterwards (freed blocks stay cached, so NVML plateaus while
torch's allocated memory falls and rises inside every step). Field names and units
are NVML's: nvmlMemory_t {total, free, used} and nvmlProcessInfo_t {pid, usedGpuMemory},
all in bytes. The MIG variant records per-process memory as unsupported (null),
which is what a MIG slice or WSL reports.
"""

from __future__ import annotations

import json
from pathlib import Path

MiB = 1 << 20
TOTAL = 81559 * MiB  # H100 80GB HBM3 as nvidia-smi reports it (memory.total)
IDLE_USED = 4 * MiB
CONTEXT = 518 * MiB
PID = 4242
HZ = 20


def process_memory(t: float) -> int | None:
    """This run's usedGpuMemory at time t (None before its CUDA context exists)."""
    if t < 1.0:
        return None
    reserved = 0
    if t >= 1.5:  # model build: weights, in 20 MiB-rounded segments
        reserved = int(min(t - 1.5, 1.0) / 1.0 * 2200) * MiB
    if t >= 2.5:  # step 1: activations, the loss, gradients, then optimizer states; cached afterwards
        progress = min(t - 2.5, 1.2) / 1.2
        reserved = 2200 * MiB + int(progress * 9150) * MiB
    return CONTEXT + reserved // (2 * MiB) * (2 * MiB)


def records(seconds: float, *, per_process: bool) -> list[dict]:
    out = []
    for index in range(1, int(seconds * HZ) + 1):
        t = round(index / HZ, 4)
        mine = process_memory(t)
        used = IDLE_USED + (mine or 0)
        memory = {"total": TOTAL, "free": TOTAL - used, "used": used}
        processes: list[dict] | None
        if not per_process:
            processes = None
        else:
            processes = [] if mine is None else [{"pid": PID, "usedGpuMemory": mine}]
        out.append({"t": t, "memory": memory, "processes": processes})
    return out


def write(path: Path, *, per_process: bool, mig: bool) -> None:
    header = {
        "format": "memtui-nvml-stream", "version": 1, "synthetic": True,
        "source": "synthetic fixture from tests/data/make_synthetic_nvml.py, shaped like a 3-step bf16 run "
                  "on an H100 80GB HBM3; NOT recorded from a real GPU",
        "recorded_at": "2026-01-01T00:00:00+00:00", "hz": HZ, "pids": [PID],
        "device": {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-00000000-0000-0000-0000-000000000000",
                   "driver_version": "550.54.15", "memory_total": TOTAL, "compute_capability": "9.0",
                   "mig_mode": mig},
    }
    lines = [header, *records(6.0, per_process=per_process)]
    path.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines), encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).parent
    write(here / "nvml_h100_synthetic.jsonl", per_process=True, mig=False)
    write(here / "nvml_mig_synthetic.jsonl", per_process=False, mig=True)
