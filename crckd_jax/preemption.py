"""Stopping a training run cleanly on SIGTERM or SIGINT (preemption, Ctrl-C, `scancel`).

A signal only sets a flag; the loop asks `StopRequest.requested()` once per step (a host
check, no device sync), and `--mode cv` and `--mode table` ask it between two runs. With one
process the loop stops at the step it is in. With several processes they must stop at the
same point: SIGTERM goes to JAX's preemption service (the coordination service propagates
the notice to every process, which agree on a point:
`multihost_utils.reached_preemption_sync_point`), and SIGINT is turned into a SIGTERM of the
process for the same path. Every process asks at the same points (each step, each boundary
between runs), so they agree on the same one, also when the notice arrives after a run's
last step: the next boundary stops them all. The loop then checks the pending metrics,
saves a checkpoint at that step, waits until it is committed and raises `Preempted` (exit
status 75).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# JAX's preemption sync manager is one per process and agrees with the other processes on a
# number of its calls, which must grow with every call: the questions of all StopRequests of
# the process (every fold of a cv, every unit of a table) are numbered together.
_sync_questions = itertools.count(1)


def _agreed_across_processes() -> bool:
    """Whether a stop must be agreed by several processes through JAX's preemption
    service."""
    return jax.process_count() > 1 and _preemption_service()


def _preemption_service() -> bool:
    """Whether JAX's preemption sync manager runs (started by jax.distributed.initialize)."""
    try:
        from jax._src import distributed
    except ImportError:
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequest:
    """Context manager: catches SIGTERM/SIGINT while training (main thread only)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._agreed = False  # several processes: all agreed to stop
        self._multi = _agreed_across_processes()

    def _handler(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        if self._multi:  # let JAX's preemption notifier (a SIGTERM handler) tell everyone
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        # Several processes: SIGTERM stays with JAX's preemption service; SIGINT is relayed.
        for signum in (signal.SIGINT,) if self._multi else SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self) -> bool:
        """Whether to stop here. With several processes every one must ask at the same
        points; they all get True from the same one on."""
        if not self._multi:
            return self.signal_name is not None
        if not self._agreed:
            from jax.experimental import multihost_utils

            self._agreed = multihost_utils.reached_preemption_sync_point(
                next(_sync_questions))
            if self._agreed:
                self.signal_name = self.signal_name or "SIGTERM"
        return self._agreed
