"""Metric records of a run: a JSONL file and TensorBoard event files, written by process 0.

Each record is a flat dict with a `split` ('train' | 'test' | 'val'), the `step` and the
`epoch`; eval records also name the `model` ('student' | 'teacher'). TensorBoard tags are
`<split>/<key>` (`<split>_<model>/<key>` for the teacher).

A resumed run (from step S) drops the JSONL records after S (`truncate_after`) and opens a
new TensorBoard event file that purges the events after S from the earlier files
(tensorboardX's `purge_step`), so no step appears twice in either.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from crckd_jax.errors import StorageError

_QUEUE = 1 << 20  # TensorBoard events queued for the writer's thread, at most


def read_records(path: str) -> list[dict]:
    """All records of a metrics JSONL file (an empty list when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
            # the last line of a run killed while writing it: dropped
    return records


class MetricLogger:
    """Appends records to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`."""

    def __init__(self, workdir: str, purge_after: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            # Flushed after every record (a log period, not a step), so a killed run keeps
            # its events. The queue to the writer's thread is large enough that a thread
            # stopped by a write error (a full disk) never blocks the loop or `close`.
            # A resumed run hides the events after its step that an earlier run wrote.
            self.tensorboard_dir = os.path.join(workdir, "tensorboard")
            try:
                self._tb = SummaryWriter(
                    self.tensorboard_dir, flush_secs=30, max_queue=_QUEUE,
                    purge_step=None if purge_after is None else purge_after + 1)
            except OSError as e:
                raise StorageError(f"cannot write {self.tensorboard_dir}: {e.strerror or e}"
                                   ) from None

    def truncate_after(self, step: int) -> None:
        """Drops records past `step` (left by a run that was killed after its checkpoint)."""
        if not self.enabled:
            return
        kept = [r for r in read_records(self.path) if r["step"] <= step]
        try:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e.strerror or e}") from None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (v.item() if isinstance(v, (np.generic, np.ndarray)) else v)
                  for k, v in record.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e.strerror or e}") from None
        prefix = record["split"] + ("_teacher" if record.get("model") == "teacher" else "")
        for key, value in record.items():
            if key not in ("split", "step", "model") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        try:
            self._tb.flush()
        except OSError as e:
            raise StorageError(f"cannot write {self.tensorboard_dir}: {e.strerror or e}"
                               ) from None

    def close(self) -> None:
        """Stops the TensorBoard writer's thread (idempotent: every exit path calls it)."""
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()  # flushes the queued events
            except OSError as e:
                raise StorageError(f"cannot write {self.tensorboard_dir}: {e.strerror or e}"
                                   ) from None
