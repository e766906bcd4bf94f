"""Stopping a training run cleanly on SIGTERM or SIGINT (preemption, Ctrl-C, `scancel`).

A signal only sets a flag; the loop asks `StopRequest.reached(step)` once per step (a host
check, no device sync). With one process the loop stops at the step it is in. With several
processes they must stop at the same step: SIGTERM goes to JAX's preemption service (the
coordination service propagates the notice to every process, which agree on a step:
`multihost_utils.reached_preemption_sync_point`), and SIGINT is turned into a SIGTERM of the
process for the same path. The loop then checks the pending metrics, saves a checkpoint at
that step, waits until it is committed and raises `Preempted` (exit status 75).
"""

from __future__ import annotations

import os
import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        self._multi = jax.process_count() > 1 and _preemption_service()

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

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (then every process stops after the same step)."""
        if self._multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None
