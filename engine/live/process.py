"""Start, stream and stop a live worker from the CLI or the TUI, leaving no process behind.

The worker runs in its own session (its own process group, so a terminal's
Ctrl-C or SIGHUP reaches it only through us), with a stdin pipe only we write
to (it exits when that pipe closes: we exited, crashed or lost the SSH session),
and with the run lock's descriptor (the lock lives while either process does).
Cancel sends SIGTERM to the group and to every descendant (torchrun puts ranks
in sessions of their own), then SIGKILL to whatever is left after a grace
period: a cancelled worker is gone within two seconds and its memory with it.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from memtui.engine.errors import InputError
from memtui.engine.live.devices import LocalDevice, detect
from memtui.engine.live.lock import RunLock
from memtui.engine.live.plan import LiveOptions, RunPlan, make_plan
from memtui.engine.live.protocol import FINAL_TYPES, decode
from memtui.engine.python_command import python_module
from memtui.engine.model.specs import TrainingConfig

CANCEL_GRACE_S = 1.0
_running: set[WorkerProcess] = set()  # for the atexit sweep


class LiveRefused(Exception):
    """The run may not start (does not fit, an option this device cannot run, a run already going)."""


@dataclass
class Preflight:
    """The parent's view before starting: the device, the plan where it could make one."""

    device_kind: str
    ranks: int
    plan: RunPlan | None
    device: LocalDevice | None
    note: str = ""


def preflight(config: TrainingConfig, options: LiveOptions) -> Preflight:
    """Check a run without torch; InputError for bad options, LiveRefused when it may not start."""
    options.validate()
    device, note = detect(options.device)
    if device is None:
        if options.device == "cuda":
            # NVML cannot describe the GPU (WSL, MIG, no driver?): the worker checks with torch.
            return Preflight(device_kind="cuda", ranks=config.dp, plan=None, device=None, note=note)
        raise InputError("--device", note)
    plan = make_plan(config, options, device, device_count=device.device_count if device.kind == "cuda" else None)
    if plan.refusal:
        raise LiveRefused(plan.refusal)
    return Preflight(device_kind=device.kind, ranks=plan.ranks, plan=plan, device=device, note=note)


def worker_command(config: TrainingConfig, options: LiveOptions, device_kind: str, ranks: int) -> list[str]:
    request = json.dumps({"config": config.model_dump(mode="json"), "options": options.as_json(), "device": device_kind})
    worker = python_module("memtui.engine.live.worker", "--request", request)
    if ranks <= 1:
        return worker
    # torchrun: one worker per rank, rendezvous on a free local port; --no-python runs our argv as it is.
    return python_module("torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "--no-python", *worker)


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    # glibc: a fixed mmap threshold returns a freed tensor's pages to the OS (as a tensor-sized
    # block), so a CPU run's RSS follows the live tensors instead of keeping freed heap.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    return env


class WorkerProcess:
    """One worker: `start()`, iterate `messages()`, and always `close()` (or use `with`)."""

    def __init__(self, config: TrainingConfig, options: LiveOptions, *, device_kind: str, ranks: int = 1,
                 lock: bool = True, owner: str = "memtui run") -> None:
        self.command = worker_command(config, options, device_kind, ranks)
        self.lock = RunLock() if lock else None
        self.owner = owner
        self.process: subprocess.Popen | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.final: dict[str, Any] | None = None
        self.cancelled = False
        self._buffer = b""
        self._seen: set[int] = set()

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> WorkerProcess:
        if self.lock is not None:
            from memtui.engine.live.lock import RunLockBusy

            try:
                self.lock.acquire(self.owner)
            except RunLockBusy as busy:
                raise LiveRefused(str(busy)) from None
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, env=worker_env(), cwd=os.getcwd(),
                pass_fds=(self.lock.fd,) if self.lock is not None and self.lock.fd is not None else (),
            )
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        _running.add(self)
        threading.Thread(target=self._read_stderr, name="memtui-worker-stderr", daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)

    def descendants(self) -> list[psutil.Process]:
        """The worker and every process below it (torchrun's ranks live in sessions of their own)."""
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            found = []
        self._seen.update(process.pid for process in found)
        return found

    def interrupt(self) -> None:
        """SIGTERM to the run and return at once: the worker sends its cancelled summary and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.cancelled = True
        self._signal(signal.SIGTERM, self.descendants())

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns once nothing of the run is left."""
        if self.process is None:
            return
        self.cancelled = True
        family = self.descendants()
        self._signal(signal.SIGTERM, family)
        _gone, alive = psutil.wait_procs(family, timeout=grace) if family else ([], [])
        if alive or self.process.poll() is None:
            self._signal(signal.SIGKILL, self.descendants() + alive)
            psutil.wait_procs(alive, timeout=2.0)
        self._reap()

    def _signal(self, signum: int, family: list[psutil.Process]) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)  # the session we started: worker (and torchrun agent)
        except (ProcessLookupError, PermissionError):
            pass
        for member in family:
            try:
                member.send_signal(signum)
            except psutil.Error:
                pass

    def _reap(self) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """End the worker if it is still running, reap it, release the lock. Safe to call twice."""
        if self.process is not None:
            if self.process.poll() is None:
                self.cancel()
            else:
                # The worker exited by itself; make sure nothing it started survives it.
                leftovers = [p for p in self._alive_seen() if p.pid != self.process.pid]
                if leftovers:
                    self._signal(signal.SIGKILL, leftovers)
                self._reap()
        if self.lock is not None:
            self.lock.release()
        _running.discard(self)

    def _alive_seen(self) -> list[psutil.Process]:
        alive = []
        for pid in self._seen:
            try:
                alive.append(psutil.Process(pid))
            except psutil.Error:
                continue
        return alive

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- the stream ------------------------------------------------------------------------
    def messages(self, stop: Callable[[], bool] | None = None, poll: float = 0.1) -> Iterator[dict[str, Any]]:
        """Protocol messages until the worker's last one; `stop()` true ends the iteration early.

        When the worker dies without a final message (killed, crashed before it could say),
        an `error` message built from its exit code and stderr comes last instead.
        """
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        last_scan = 0.0
        try:
            while True:
                if stop is not None and stop():
                    return
                if time.monotonic() - last_scan > 1.0:
                    self.descendants()  # remember who belongs to the run, for the final sweep
                    last_scan = time.monotonic()
                if not selector.select(timeout=poll):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split(b"\n")
                for line in lines:
                    message = decode(line)
                    if message is None:
                        continue
                    if message["type"] in FINAL_TYPES:
                        self.final = message
                    yield message
        finally:
            selector.close()
        code = self.process.wait()
        if self.final is None:
            self.final = self._death_message(code)
            yield self.final

    def _death_message(self, code: int) -> dict[str, Any]:
        time.sleep(0.05)  # let the stderr reader catch the last lines
        if code < 0:
            reason = f"the worker was killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL and not self.cancelled:
                reason += " (the system's OOM killer?)"
        else:
            reason = f"the worker exited with code {code}"
        detail = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
        return {"type": "error", "text": f"{reason}: {detail}" if detail else reason}


def _sweep() -> None:
    for worker in list(_running):
        try:
            worker.close()
        except Exception:
            pass


atexit.register(_sweep)
