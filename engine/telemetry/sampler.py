"""A thread that reads memory sources at a fixed rate and emits one sample per tick.

Each source is a callable returning a dict of fields (bytes, or None for N/A);
a source that raises is N/A for that tick, never the end of the run. Ticks are
scheduled on absolute deadlines so 20 Hz stays 20 Hz when a read is slow, and
`stop()` returns within one tick.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from memtui.engine.telemetry.host import ProcessRss
from memtui.engine.telemetry.nvml import Nvml

Source = Callable[[], dict[str, Any]]
Emit = Callable[[dict[str, Any]], None]

DEFAULT_HZ = 20.0
# Every sample carries these, None where the run cannot measure them.
SAMPLE_FIELDS = ("allocated", "reserved", "nvml_used", "rss")


class Sampler:
    def __init__(self, sources: Sequence[Source], emit: Emit, *, hz: float = DEFAULT_HZ, started: float | None = None) -> None:
        if hz <= 0:
            raise ValueError("hz must be positive")
        self.sources = list(sources)
        self.emit = emit
        self.interval = 1.0 / hz
        self.started = time.monotonic() if started is None else started
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memtui-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self, *, final: bool = True) -> None:
        """Stop the thread; `final` takes one last sample so the end of the run is on the curve."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.interval + 1.0)
        if final:
            self.tick()

    def read(self) -> dict[str, Any]:
        sample: dict[str, Any] = {"type": "sample", "t": round(time.monotonic() - self.started, 4)}
        sample.update(dict.fromkeys(SAMPLE_FIELDS))
        for source in self.sources:
            try:
                sample.update(source())
            except Exception:
                continue  # N/A this tick; the fields keep None
        return sample

    def tick(self) -> None:
        sample = self.read()
        self.count += 1
        self.emit(sample)

    def _loop(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            self.tick()
            deadline += self.interval
            delay = deadline - time.monotonic()
            if delay < 0:  # fell behind (a slow read); skip the missed ticks rather than burst
                deadline = time.monotonic()
                delay = 0
            if self._stop.wait(delay):
                break


def rss_source(pid: int | None = None) -> Source:
    process = ProcessRss(pid)
    return lambda: {"rss": process.read()}


def nvml_source(nvml: Nvml, pids: Callable[[], Sequence[int]], record: Callable[[float, Any], None] | None = None) -> Source:
    """Device used memory and this run's process memory; `record` gets each raw reading."""

    def read() -> dict[str, Any]:
        reading = nvml.read()
        if record is not None:
            record(time.monotonic(), reading)
        return {"nvml_used": reading.used, "nvml_process": reading.process_used(pids())}

    return read
