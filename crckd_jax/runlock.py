"""One run per workdir: an OS file lock (`fcntl.flock`) on `<workdir>/run.lock`.

The lock belongs to the open file, so the OS releases it when the holding process ends,
however it ends (SIGKILL included): a lock file left behind by a dead process never blocks.
The file holds the holder's host, pid, mode and start time, which a second run names in its
error. In a multi-process run only process 0 takes the lock (the processes of one run share
the workdir; on a shared filesystem a second run's process 0 meets the first's lock, where
NFS v4 and Lustre implement flock across machines).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from crckd_jax.errors import WorkdirLocked

LOCK_NAME = "run.lock"


class WorkdirLock:
    """Context manager holding the lock of `workdir` (no-op when `enabled` is False)."""

    def __init__(self, workdir: str, mode: str, enabled: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.mode = mode
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirLocked(
                f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}; "
                f"lock {self.path}): wait for it to end or stop it, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"host {socket.gethostname()} pid {os.getpid()} mode {self.mode} "
                       f"since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n").encode(), 0)
        self._fd = fd

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
