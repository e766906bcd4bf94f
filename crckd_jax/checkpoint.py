"""Checkpoints of a run with orbax: the whole TrainState, the data iterator, the config.

Each checkpoint is a step folder under `<workdir>/checkpoints` holding three items:
`state` (the TrainState pytree: parameters, EMA, optimizer, memory with Z, RNG),
`data` (the grain iterator state, to continue the exact batch sequence) and `meta` (the
config, the class names and the epoch). Saves are asynchronous; orbax writes each step into
a temporary folder and renames it when complete, so a crash during a save never leaves a
checkpoint that looks finished. The last `keep` checkpoints are kept; a run with a
validation split also keeps its best epoch's checkpoint in `<workdir>/best_checkpoint`
(`best=True`).

Leftover temporary folders of saves that a crash interrupted (`*.orbax-checkpoint-tmp*`) are
incomplete by construction: they are removed (process 0) when a run opens the folder for
writing, and ignored by reads. A checkpoint that does not restore (e.g. a truncated file)
is reported in one line and, when training, moved to
`<workdir>/damaged_checkpoints/<step>-<time>` (never deleted); the newest checkpoint that
restores is used instead. A failed write (full disk, ...) raises
StorageError naming the folder and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from crckd_jax.errors import CheckpointUnavailable, StorageError

DAMAGED_DIR = "damaged_checkpoints"  # next to the checkpoints folder


@dataclasses.dataclass
class Restored:
    """What a checkpoint holds."""

    step: int
    state: Any
    data: dict
    meta: dict


def _remove_leftovers(directory: str) -> list[str]:
    """Removes the temporary folders of interrupted saves in `directory` (process 0)."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return []
    leftovers = sorted(p for p in os.listdir(directory) if ".orbax-checkpoint-tmp" in p)
    for name in leftovers:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return leftovers


def _best_validation(metrics: dict) -> tuple[float, int]:
    """The rank of an epoch's checkpoint: validation balanced accuracy, then earlier first
    (as the summary's `best_val` view picks its epoch)."""
    return metrics["val_bacc"], -metrics["epoch"]


def restore_read_only(directory: str, target: Callable[["Checkpointer"], Any], workdir: str,
                      log: Callable[[str], None] = print) -> "Restored":
    """The newest checkpoint of `directory` that restores, read-only (a damaged newer one is
    reported, not moved), laid out like `target(checkpointer)`; CheckpointUnavailable when
    there is none or none restores."""
    checkpoints = Checkpointer(directory, read_only=True)
    try:
        if checkpoints.latest_step() is None:
            raise CheckpointUnavailable(f"no checkpoint in {checkpoints.directory}: train "
                                        f"first (--mode train with --workdir {workdir})")
        restored = checkpoints.restore_newest_good(target(checkpoints), log=log,
                                                   move_damaged=False)
        if restored is None:
            raise CheckpointUnavailable(f"no checkpoint in {checkpoints.directory} can be "
                                        f"restored ({checkpoints.failure})")
    finally:
        checkpoints.close()
    return restored


class Checkpointer:
    """An orbax CheckpointManager for one run directory."""

    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True,
                 read_only: bool = False, best: bool = False):
        """`keep` newest checkpoints, or with `best` the `keep` best by the `metrics` given to
        `save`: highest `val_bacc`, the earliest `epoch` among equals (orbax `best_fn`)."""
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self.removed_leftovers = [] if read_only else _remove_leftovers(self.directory)
        self.failure: str | None = None
        ranking = dict(best_fn=_best_validation, best_mode="max",
                       keep_checkpoints_without_metrics=False) if best else {}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=asynchronous, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only, **ranking)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "data": ocp.JsonCheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()})
        except OSError as e:
            raise StorageError(f"cannot open the checkpoint folder {self.directory}: "
                               f"{e.strerror or e}") from None
        self._last_good: int | None = self.manager.latest_step()
        self._pending: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _storage_error(self, what: str, e: BaseException) -> StorageError:
        reason = getattr(e, "strerror", None) or str(e)
        path = getattr(e, "filename", None) or self.directory
        kept = (f"the last good checkpoint is step {self._last_good} in {self.directory}"
                if self._last_good is not None else "no checkpoint was committed before")
        return StorageError(f"{what} failed: {reason} ({path}); {kept}")

    def save(self, step: int, state: Any, data: dict, meta: dict,
             metrics: dict | None = None) -> None:
        """Starts an asynchronous save of `step` (device arrays are copied before return).
        A failed write (of this save or of the previous one, which completes first) raises
        StorageError. `metrics` ranks the checkpoints of a `best` Checkpointer."""
        previous = self._pending
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta)), metrics=metrics)
        except OSError as e:
            raise self._storage_error(f"saving checkpoint step {step}", e) from None
        if previous is not None:  # committed before this save could start
            self._last_good = previous
        self._pending = step

    def restore_newest_good(self, target_state: Any, log: Callable[[str], None] = print,
                            move_damaged: bool = True) -> "Restored | None":
        """The newest checkpoint that restores; None (with the newest one's failure as
        `self.failure`) when none does. Each newer one that fails is reported in one line and,
        with `move_damaged`, moved aside by process 0 once an older one has restored (when
        none restores, the config more likely does not fit the checkpoints: nothing moves)."""
        failed = []
        self.failure = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(target_state, step)
            except Exception as e:  # noqa: BLE001 - any failure means: not restorable
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                text = text.split(" See full TensorStore details")[0][:300]
                failed.append((step, f"{type(e).__name__}: {text}"))
                continue
            for bad, reason in failed:
                self._report_damaged(bad, reason, log, move_damaged)
            if failed and move_damaged and not self.read_only:
                self.manager.reload()
            return restored
        if failed:
            self.failure = f"step {failed[0][0]}: {failed[0][1]}"
        return None

    def _report_damaged(self, step: int, reason: str, log: Callable[[str], None],
                        move: bool) -> None:
        where = os.path.join(self.directory, str(step))
        if not move or self.read_only:
            log(f"warning: checkpoint step {step} ({where}) cannot be restored ({reason}); "
                "using an earlier one")
        elif jax.process_index() != 0:
            log(f"warning: checkpoint step {step} cannot be restored ({reason}); process 0 "
                "moves it aside")
        else:
            aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR,
                                 f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(where, aside)
            log(f"warning: checkpoint step {step} cannot be restored ({reason}); moved to "
                f"{aside}, using an earlier one")

    def single_device_target(self) -> Any:
        """The saved state's structure, shapes and dtypes (from the newest checkpoint whose
        metadata reads: a damaged newer one is passed over), laid on the first local device:
        a restore target that needs neither the run's config nor its devices."""
        device = jax.local_devices()[0]
        failure = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                metadata = self.manager.item_metadata(step)["state"]
            except Exception as e:  # noqa: BLE001 - any failure means: not readable
                failure = failure or f"step {step}: {type(e).__name__}: {str(e)[:300]}"
                continue
            return jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(
                    m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
                metadata)
        raise CheckpointUnavailable(f"no checkpoint in {self.directory} can be read "
                                    f"({failure or 'none saved'})")

    def restore(self, target_state: Any, step: int | None = None) -> Restored:
        """The checkpoint `step` (default: latest), its state laid out like `target_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        self._last_good = step
        return Restored(step, restored["state"], restored["data"], restored["meta"])

    def wait(self) -> None:
        """Waits until the pending save is committed (StorageError when it failed)."""
        pending = self._pending
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise self._storage_error(f"saving checkpoint step {pending}", e) from None
        if pending is not None:
            self._last_good, self._pending = pending, None

    def close(self) -> None:
        self.manager.close()
