"""Host-side figures through psutil: a process's resident memory and the RAM still available."""

from __future__ import annotations

import os
import platform

import psutil


class ProcessRss:
    """Resident set size of one process, read at sampling rate; None once it is gone."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        try:
            self._process: psutil.Process | None = psutil.Process(self.pid)
        except psutil.Error:
            self._process = None

    def read(self) -> int | None:
        if self._process is None:
            return None
        try:
            return int(self._process.memory_info().rss)
        except psutil.Error:
            return None


def available_memory_bytes() -> int:
    """RAM the kernel could hand out now without swapping (MemAvailable on Linux)."""
    return int(psutil.virtual_memory().available)


def total_memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def cpu_name() -> str:
    """A readable CPU name for labels; falls back to the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
