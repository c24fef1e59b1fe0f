"""Run one live worker from a thread: start it, buffer its messages, post coalesced updates, stop it.

Blocking work (the preflight, starting the process, reading its pipe) happens on
the thread that calls `run()`; the UI thread only calls `request_stop()` (which
returns at once) and drains `take()`. Whatever ends the run (its summary, `s`,
the app quitting, an exception) goes through `WorkerProcess.close()`, which
leaves no process behind.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from textual.message import Message

from memtui.tui.live.messages import LiveRunEnded, LiveStreamUpdated


class LiveRunController:
    def __init__(self, post: Callable[[Message], Any], *, lock: bool = True) -> None:
        self._post = post
        self._lock_runs = lock
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._worker: Any = None  # memtui.engine.live.process.WorkerProcess while running

    # ---- called from the UI thread -----------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the run to end; the thread sees it within 0.1 s and cancels the worker."""
        self._stop.set()

    def take(self) -> list[dict[str, Any]]:
        """Every message received since the last call, in order."""
        with self._guard:
            messages = list(self._buffer)
            self._buffer.clear()
        return messages

    def shutdown(self) -> None:
        """End the run now, synchronously (app exit): nothing may outlive the app."""
        self._stop.set()
        worker = self._worker
        if worker is not None:
            worker.close()

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.pid if worker is not None else None

    # ---- called from the thread worker -------------------------------------------------------
    def run(self, config: Any, options: Any, cancelled: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Preflight, start, stream until the end; returns (and posts) the final message."""
        from memtui.engine.errors import InputError
        from memtui.engine.live.process import LiveRefused, WorkerProcess, preflight
        from memtui.engine.live.protocol import is_final

        self._stop.clear()
        stop = lambda: self._stop.is_set() or cancelled()  # noqa: E731
        final: dict[str, Any]
        try:
            checked = preflight(config, options)
            if checked.note:
                self._push({"type": "notice", "level": "info", "text": checked.note})
            for notice in checked.plan.notices if checked.plan is not None else ():
                # What this device cannot run (QLoRA, 8-bit Adam on a CPU): said now, not once torch has loaded.
                self._push({"type": "notice", "level": "warning", "text": notice})
            worker = WorkerProcess(config, options, device_kind=checked.device_kind, ranks=checked.ranks,
                                   lock=self._lock_runs, owner="memtui TUI")
            self._worker = worker
            try:
                worker.start()
                final = {"type": "error", "text": "the run ended without a result"}
                for message in worker.messages(stop=stop):
                    self._push(message)
                    if is_final(message):
                        final = message
                if stop() and worker.final is None:
                    worker.cancel()
                    final = {"type": "summary", "result": "cancelled", "stopped": True}
            finally:
                worker.close()
                self._worker = None
        except LiveRefused as refused:
            final = {"type": "refused", "reason": str(refused)}
        except InputError as error:
            final = {"type": "refused", "reason": str(error)}
        self._post(LiveRunEnded(final))
        return final

    def _push(self, message: dict[str, Any]) -> None:
        with self._guard:
            self._buffer.append(message)
        self._post(LiveStreamUpdated())
