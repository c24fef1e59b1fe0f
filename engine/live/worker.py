"""`python -m memtui.engine.live.worker --request JSON`: train the planned run and stream what it measures.

The worker is the only process that imports torch. It writes protocol messages
(memtui.engine.live.protocol) to its own copy of stdout and points file descriptor 1
at stderr, so nothing a library prints can corrupt the stream. It ends:

- after the summary (exit 0), or refused (exit 2), or on an error (exit 1);
- on SIGTERM / SIGINT / SIGHUP (cancel): a short "cancelled" summary, then exit;
- when its parent goes away: stdin is a pipe only the parent writes to, so EOF
  there (the parent exited, crashed or lost its SSH session) ends the worker,
  and a changed parent PID is checked as well.

Under torchrun (WORLD_SIZE > 1) every rank trains and rank 0 alone streams.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import stat
import sys
import threading
import time
import traceback
from typing import Any

from memtui.engine.live.protocol import Cancelled, encode

PARENT_POLL_S = 0.2
# The worker trains at a lower CPU priority than the app that shows it: on a 2-core laptop a CPU run
# otherwise takes the cores the UI needs to answer a key. MEMTUI_WORKER_NICE overrides it (0: as the parent).
NICE_ENV = "MEMTUI_WORKER_NICE"
DEFAULT_NICENESS = 10


class Emitter:
    """Writes one message per line, from any thread; a closed pipe means the parent is gone."""

    def __init__(self, stream: Any, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self._lock = threading.Lock()
        self.closed = False

    def __call__(self, message: dict[str, Any]) -> None:
        if not self.enabled or self.closed:
            return
        line = encode(message) + "\n"
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.closed = True
                os._exit(1)  # nobody reads us any more


class RunState:
    def __init__(self) -> None:
        self.step = 0
        self.phase = "starting"
        self.cancelled = False

    def fields(self) -> dict[str, Any]:
        return {"step": self.step, "phase": self.phase}


def _private_stdout():
    """The protocol's own stream; fd 1 (and print) now go to stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def watch_parent() -> None:
    """End this process when the parent goes away (stdin EOF or a new parent PID)."""
    parent = os.getppid()
    try:
        stdin_is_pipe = stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        stdin_is_pipe = False

    def loop() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            if stdin_is_pipe:
                try:
                    readable, _, _ = select.select([0], [], [], PARENT_POLL_S)
                    if readable and os.read(0, 4096) == b"":
                        os._exit(1)
                except OSError:
                    os._exit(1)
            else:
                time.sleep(PARENT_POLL_S)

    threading.Thread(target=loop, name="memtui-parent-watch", daemon=True).start()


def lower_priority() -> int:
    """Add MEMTUI_WORKER_NICE (default 10) to this process's niceness; the niceness now."""
    try:
        increment = int(os.environ.get(NICE_ENV, DEFAULT_NICENESS))
    except ValueError:
        increment = DEFAULT_NICENESS
    try:
        return os.nice(max(0, increment))
    except OSError:  # not allowed here: train at the parent's priority
        return os.nice(0)


def _install_signals(state: RunState) -> None:
    def handler(_signum, _frame):
        if state.cancelled:
            return
        state.cancelled = True
        raise Cancelled

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memtui.engine.live.worker")
    parser.add_argument("--request", required=True, help="JSON: {config, options, device}")
    args = parser.parse_args(argv)
    request = json.loads(args.request)

    rank = int(os.environ.get("RANK", "0"))
    lower_priority()
    out = Emitter(_private_stdout(), enabled=rank == 0)
    state = RunState()
    _install_signals(state)
    watch_parent()
    started = time.monotonic()
    out({"type": "hello", "pid": os.getpid(), "t": 0.0, "rank": rank,
         "world_size": int(os.environ.get("WORLD_SIZE", "1"))})

    from memtui.engine.live.train import TrainingRun  # noqa: PLC0415 - after the stream is safe

    run = TrainingRun(request, out, state, started)
    try:
        return run.execute()
    except Cancelled:
        run.finish_cancelled()
        return 0
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        run.stop_sampling()
        text = f"{error.__class__.__name__}: {error}".splitlines()[0][:500]
        out({"type": "error", "text": text})
        return 1
    finally:
        run.close()


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: no lingering threads, nothing left to flush
