"""One live run per machine: an exclusive flock on a file every memtui process can open.

The parent takes the lock before starting the worker and passes the descriptor
to it, so the lock lives exactly as long as either process: a crashed parent
leaves it held by a worker that is still running, and a killed worker (SIGKILL,
OOM killer) releases it with its last descriptor. The file records who holds it,
for the refusal message.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path

from memtui.engine.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not serialised there
    fcntl = None  # type: ignore[assignment]

LOCK_DIR_ENV = "MEMTUI_LOCK_DIR"
LOCK_NAME = "memtui-live.lock"


class RunLockBusy(RuntimeError):
    """Another live run holds the lock; the message says which."""


def lock_path() -> Path:
    """Machine-wide by default (the temp dir is shared by every user); MEMTUI_LOCK_DIR overrides it."""
    override = os.environ.get(LOCK_DIR_ENV)
    if not override:
        return Path(tempfile.gettempdir()) / LOCK_NAME
    try:
        return Path(override).expanduser() / LOCK_NAME
    except RuntimeError:  # ~nosuchuser
        raise InputError(LOCK_DIR_ENV, f"cannot expand {override!r}: no such user") from None


class RunLock:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or lock_path()
        self.fd: int | None = None

    def acquire(self, owner: str = "memtui run") -> RunLock:
        """Take the lock without waiting; RunLockBusy when another run holds it."""
        fd = self._open()
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockBusy(f"another live run is in progress on this machine{holder}; one at a time") from None
        self.fd = fd
        try:
            os.fchmod(fd, 0o666)  # let other users' memtui take it after us
        except OSError:
            pass
        _write_holder(fd, owner)
        return self

    def _open(self) -> int:
        """The lock file's descriptor; an unusable directory is a one-line error naming MEMTUI_LOCK_DIR."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:
                return os.open(self.path, os.O_RDONLY)  # another user's file: locking needs no write access
        except OSError as error:
            raise InputError(
                LOCK_DIR_ENV, f"cannot use {str(self.path.parent)!r} for the run lock: {error.strerror or error}"
            ) from None

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _write_holder(fd: int, owner: str) -> None:
    record = {"pid": os.getpid(), "owner": owner, "since": _dt.datetime.now().isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError:
        pass  # read-only file: the lock still holds, only the description is missing


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(data, dict) or "pid" not in data:
        return ""
    return f" ({data.get('owner', 'memtui')}, pid {data['pid']}, since {data.get('since', '?')})"
