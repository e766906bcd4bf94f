"""One run per workdir: an OS file lock (`fcntl.flock`) on `<workdir>/run.lock`.

The lock belongs to the open file, so the OS releases it when the holding process ends,
however it ends (SIGKILL included): a lock file left behind by a dead process never blocks.
The file holds the holder's host, pid, mode and start time, which a second run names in its
error. In a multi-process run only process 0 takes the lock (the processes of one run share
the workdir; on a shared filesystem a second run's process 0 meets the first's lock, where
NFS v4 and Lustre implement flock across machines).

Processes that train the units of one cv or table workdir together (`--share_workdir`)
hold its lock shared (`shared=True`): they exclude a plain run, not each other; each
claims the unit it trains by that unit folder's own lock (`try_acquire`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from typing import Callable

from crckd_jax.errors import WorkdirLocked

LOCK_NAME = "run.lock"


class WorkdirLock:
    """Context manager holding the lock of `workdir` (no-op when `enabled` is False);
    `shared`: held together with other shared holders (`--share_workdir`)."""

    def __init__(self, workdir: str, mode: str, enabled: bool = True, shared: bool = False):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.mode = mode
        self.enabled = enabled
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock; WorkdirLocked naming the holder when another run has it."""
        if not self.enabled:
            return
        holder = self.try_acquire()
        if holder is None:
            return
        hint = ("; its processes share the workdir's units: add --share_workdir to join "
                "them" if "(shared)" in holder and not self.shared else "")
        raise WorkdirLocked(
            f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}; "
            f"lock {self.path}): wait for it to end or stop it, or use another --workdir"
            + hint)

    def try_acquire(self) -> str | None:
        """Takes the lock if it is free: None; else the holder's description (host, pid,
        mode, start), and nothing is held. Always None when not `enabled`."""
        if not self.enabled:
            return None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            return holder
        # shared holders: the newest one's description
        _describe(fd, f"mode {self.mode}{' (shared)' if self.shared else ''} "
                      f"since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        self._fd = fd
        return None

    def release(self) -> None:
        # The file stays (removing it would race with a run opening it); the lock goes.
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def exclusive(path: str, waiting: str, log: Callable[[str], None]):
    """Holds an exclusive `flock` on the file `path` while the body runs (released when the
    process ends, however it ends), waiting while another process holds it; `waiting` is
    logged first, with the holder: e.g. one process prepares a data set that others need,
    they wait and then find it prepared."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"{waiting} (lock {path}, held by {_holder(fd)})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        _describe(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """The description the lock file `fd` holds (its holder's, `_describe`)."""
    return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"


def _describe(fd: int, details: str = "") -> None:
    """Writes this process (host, pid, `details`) as the holder of the lock file `fd`."""
    text = f"host {socket.gethostname()} pid {os.getpid()}{' ' if details else ''}{details}\n"
    data = text.encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
