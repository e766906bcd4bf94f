"""The training loop: epochs, evaluation, checkpoints, logs, progress, NaN guard.

`train_and_evaluate(settings, folder)` prepares the data if needed, builds the model, the
optimizer, the memory and one `TrainState`, resumes from the latest checkpoint in
`<W>/checkpoints` if there is one, trains with the compiled data-parallel step,
evaluates the student (and optionally the teacher) on the held-out fold after every epoch,
and writes `summary.json` and the report figures. Running it again on the same run folder
continues where it stopped and ends with the same parameters as an uninterrupted run.
`train_folds` does the same for several folds of one rung side by side, in one program.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from crckd_jax import builder
from crckd_jax.checkpoint import Checkpointer, Restored
from crckd_jax.data import pipeline
from crckd_jax.errors import CheckpointUnavailable, Preempted, StorageError, TrainingDiverged
from crckd_jax.logger import MetricLogger, read_records
from crckd_jax.metrics import format_metrics
from crckd_jax.objective import LOSS_KEYS, epoch_of_step
from crckd_jax.preemption import StopRequest
from crckd_jax.run_folder import SUMMARY_FILE, RunFolder
from crckd_jax.separation import class_separation
from crckd_jax.settings import Settings
from crckd_jax.summary import summarise
from crckd_jax.trainer import Trainer, build_trainer


def _format_losses(terms: dict) -> str:
    return " ".join(f"{k}={terms[k]:.4g}" for k in LOSS_KEYS if k in terms)


def train_and_evaluate(settings: Settings, folder: RunFolder,
                       log: Callable[[str], None] = print,
                       allow_config_change: bool = False) -> dict:
    """Trains one fold in `folder` (resuming if possible); returns the summary dict.

    The run's settings are written to its config.json; resuming with settings that differ
    in a computation-changing key raises ConfigChanged before anything is restored, unless
    `allow_config_change`. On SIGTERM/SIGINT the run saves a checkpoint at the step it
    reached and raises Preempted. `settings` pass `config.require_initialisation`.
    """
    return train_folds([(settings, folder)], log, allow_config_change)[0]


def train_folds(runs: list[tuple[Settings, RunFolder]], log: Callable[[str], None] = print,
                allow_config_change: bool = False) -> list[dict]:
    """Trains the runs [(settings, folder)] (folds of one rung: settings equal but for
    `data.fold`, `builder.DataDescription` giving them one program) side by side, as one
    compiled step over their stacked states (`Run.folds_train_step`); one run alone takes
    the run's own step. Each run keeps its own folder, data order, checkpoints, metrics and
    summary, as if trained alone; returns the summaries in `runs`' order.

    Runs whose epochs differ in steps (training parts of sizes on both sides of a multiple
    of the batch) cannot share a step: they train in groups of equal length, one group
    after the other. Resuming restores the runs of a group at the newest step they all have
    (a run killed between the runs' saves is one checkpoint ahead: that one is moved aside,
    not deleted).
    """
    folds: list[_Fold] = []
    failed = True
    try:
        for settings, folder in runs:
            folds.append(_Fold.open(settings, folder, log, allow_config_change,
                                    name=f"fold {settings.data.fold}" if len(runs) > 1
                                    else ""))
            folds[-1].restore(log)
        summaries = {}
        for group in _equal_length_groups(folds, log):
            failed = True
            start = _common_start(group, log)
            for fold in group:
                fold.start(start, log)
            lanes = _Lanes(group)
            parallel = lanes.run.parallel
            if parallel.fold_groups > 1 and not parallel.folds_split(len(group)):
                log(f"{', '.join(f.name or 'the run' for f in group)}: not a multiple of the "
                    f"{parallel.fold_groups} fold groups of devices (parallel.fold_axis_size), "
                    "so every group trains them, the same work on each")
            with StopRequest() as stop:
                state, last_tests = _train_loop(lanes, lanes.initial_state(), start, stop)
                for fold in group:
                    fold.wait()
                for fold, fold_state, last_test in zip(group, lanes.fold_states(state),
                                                       last_tests):
                    summaries[id(fold)] = _finish(fold, fold_state, last_test, log)
            failed = False
            if stop.requested():  # arrived while the finished runs were evaluated
                where = ", ".join(fold.folder.root for fold in group)
                raise Preempted(
                    f"stopped by {stop.signal_name} after the run ended: its checkpoint and "
                    f"summary are saved in {where}; nothing further is run")
        return [summaries[id(fold)] for fold in folds]
    finally:
        # Every exit path: the pending saves end (their error, if any, only when nothing
        # else failed), the TensorBoard writers' threads stop, the managers close.
        try:
            for fold in folds:
                fold.wait()
        except StorageError:
            if not failed:
                raise
        finally:
            _close_all([closer for fold in folds for closer in fold.closers()], failed)


@dataclasses.dataclass
class _Fold:
    """One run of `train_folds`: its settings, folder, data and checkpoints (`open`), the
    checkpoint it resumes from, and its metric log and training batches (`start`).
    `name` ('fold k', '' for a run trained alone) prefixes its messages."""

    name: str
    settings: Settings
    folder: RunFolder
    trainer: Trainer
    checkpoints: Checkpointer
    best: Checkpointer | None
    restored: Restored | None = None
    logger: MetricLogger | None = None
    batches: Any = None

    @classmethod
    def open(cls, settings: Settings, folder: RunFolder, log: Callable[[str], None],
             allow_config_change: bool, name: str) -> "_Fold":
        os.makedirs(folder.root, exist_ok=True)
        folder.check_resumable(settings, allow_config_change, log)
        builder.check_before_data(settings)  # before the data set is prepared (minutes)
        trainer = build_trainer(settings, folder.data_dir, log)
        checkpoints = Checkpointer(folder.checkpoints, keep=settings.train.keep_checkpoints)
        best = (Checkpointer(folder.best_checkpoint, keep=1, best=True)
                if "val" in trainer.eval_splits else None)
        for opened in filter(None, (checkpoints, best)):
            if opened.removed_leftovers:
                log(f"removed the unfinished save(s) of an interrupted run: "
                    f"{', '.join(opened.removed_leftovers)} ({opened.directory})")
        return cls(name, settings, folder, trainer, checkpoints, best)

    def restore(self, log: Callable[[str], None]) -> None:
        """The newest checkpoint that restores, if any (CheckpointUnavailable when there
        are checkpoints and none restores)."""
        checkpoints = self.checkpoints
        if checkpoints.latest_step() is None:
            return
        self.restored = checkpoints.restore_newest_good(self.trainer.run.abstract_state(),
                                                        log=log)
        if self.restored is None:
            raise CheckpointUnavailable(
                f"no checkpoint in {checkpoints.directory} can be restored with this config "
                f"({checkpoints.failure}); check that the config fits the run, or move the "
                "checkpoints folder away to start from scratch")

    @property
    def restored_step(self) -> int:
        return self.restored.step if self.restored else 0

    def prefix(self, text: str) -> str:
        return f"{self.name}: {text}" if self.name else text

    def start(self, step: int, log: Callable[[str], None]) -> None:
        """Writes config.json, opens the metric log (records after `step` dropped) and the
        training batches (from the restored checkpoint's iterator state)."""
        settings = self.settings
        if jax.process_index() == 0:
            self.folder.write_config(settings)
        self.logger = MetricLogger(self.folder.root, purge_after=step)
        if self.restored:
            self.batches = self.trainer.train_batches(pipeline.rescale_iterator_state(
                self.restored.data, settings.train.batch_size,
                self.restored.meta.get("process_count", jax.process_count())))
            log(self.prefix(f"resumed from step {step} ({self.checkpoints.directory})"))
        else:
            self.batches = self.trainer.train_batches()
        self.logger.truncate_after(step)

    def state(self):
        """The state to go on from, in the backend's layout."""
        run = self.trainer.run
        return run.parallel.put_state(self.restored.state if self.restored
                                      else run.initial_state)

    def wait(self) -> None:
        for opened in filter(None, (self.checkpoints, self.best)):
            opened.wait()

    def closers(self) -> list:
        return [getattr(opened, "close", None)
                for opened in (self.batches, self.logger, self.checkpoints, self.best)]


def _equal_length_groups(folds: list[_Fold], log: Callable[[str], None]) -> list[list[_Fold]]:
    """`folds` grouped by their epoch and run lengths in steps, in order."""
    groups: dict[tuple[int, int], list[_Fold]] = {}
    for fold in folds:
        run = fold.trainer.run
        groups.setdefault((run.steps_per_epoch, run.total_steps), []).append(fold)
    if len(groups) > 1:
        log("the folds differ in steps per epoch, so they train in groups of equal length: "
            + "; ".join(f"{', '.join(f.name for f in group)}: {per_epoch} steps per epoch"
                        for (per_epoch, _), group in groups.items()))
    return list(groups.values())


def _common_start(folds: list[_Fold], log: Callable[[str], None]) -> int:
    """The step every fold restores (the newest that all have): a fold further on (killed
    between two folds' saves) is restored at that step, its newer checkpoints moved aside."""
    start = min(fold.restored_step for fold in folds)
    for fold in folds:
        if fold.restored_step != start:
            fold.restored = fold.checkpoints.go_back_to(
                start, fold.trainer.run.abstract_state(), log,
                why=f"the other folds trained with it are at step {start}")
    return start


class _Lanes:
    """The folds of one `train_folds` call stepped together: one fold alone (the run's
    step, its state as it is), or K side by side (`Run.folds_train_step`, the states
    stacked on a leading fold axis [K, ...], split over the fold groups where there are
    some)."""

    def __init__(self, folds: list[_Fold]):
        self.folds = folds
        self.run = folds[0].trainer.run
        self.side_by_side = len(folds) > 1
        parallel = self.run.parallel
        if self.side_by_side:
            k = len(folds)
            self.step = self.run.folds_train_step
            self.class_weight = parallel.put_state(
                np.stack([fold.trainer.run.class_weight for fold in folds]))
            self._stack = parallel.compile_state_fn(
                lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states),
                parallel.fold_sharding(k))
            self._unstack = parallel.compile_state_fn(
                lambda state: [jax.tree.map(lambda x: x[i], state) for i in range(k)])
        else:
            self.step, self.class_weight = self.run.train_step, self.run.step_class_weight

    def initial_state(self):
        states = [fold.state() for fold in self.folds]
        return self._stack(states) if self.side_by_side else states[0]

    def advance(self, state):
        """One step of every fold, on its next batch: (state, metrics on the devices)."""
        if self.side_by_side:
            batch = tuple(next(fold.batches) for fold in self.folds)
        else:
            batch = next(self.folds[0].batches)
        return self.step(state, batch, self.class_weight)

    def fold_states(self, state) -> list:
        """Each fold's state, in the backend's layout (the eval step's and `get_state`'s)."""
        return self._unstack(state) if self.side_by_side else [state]

    def fold_metrics(self, metrics: dict) -> list[dict[str, float]]:
        """Host metrics of one step (`DataParallel.get_outputs`) -> one dict per fold."""
        if self.side_by_side:
            return [{k: float(v[i]) for k, v in metrics.items()}
                    for i in range(len(self.folds))]
        return [{k: float(v) for k, v in metrics.items()}]


def _close_all(closers: list, failed: bool) -> None:
    """Calls every closer (None ones skipped). The first one's error is raised after all
    ran, unless the run has `failed` already: then that failure is the one to report (on a
    full disk, closing the TensorBoard writer or the checkpoints fails again)."""
    first = None
    for close in filter(None, closers):
        try:
            close()
        except Exception as e:  # noqa: BLE001 - re-raised below unless the run failed
            first = first or e
    if first is not None and not failed:
        raise first


def _train_loop(lanes: _Lanes, state, start: int, stop: StopRequest | None = None):
    """Steps `start + 1 .. total` of the folds of `lanes` on their batches
    (`DataParallel.prefetch`'s iterators); returns the state and each fold's last-epoch
    student test evaluation (None when no step was left). Each fold's `best` checkpointer
    (when it has a validation split) gets every epoch's state with the student's validation
    balanced accuracy and keeps the best.

    The host never waits for a step: batches are put on the devices ahead of their step
    (`data.device_prefetch`, by a background thread), the steps' metrics stay on the
    devices and are read together every `train.log_every_steps` steps, at epoch ends and
    before each checkpoint (`_check_finite`: a non-finite loss stops the run before
    anything after it is saved).
    `stop` (a StopRequest) is asked once per step; when it says so, the step's checkpoint
    is saved and committed and Preempted is raised.
    """
    folds, run = lanes.folds, lanes.run
    settings = run.settings
    per_epoch, total = run.steps_per_epoch, run.total_steps
    every = settings.train.checkpoint_every_steps
    images_per_step = settings.train.batch_size * len(folds)
    bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0,
               unit="step", dynamic_ncols=True)
    pending = []  # (step, metrics still on the devices) since the last read
    tick, tick_step = time.perf_counter(), start
    last_tests = [None] * len(folds)
    try:  # the bar ends its line before any error is printed
        for step in range(start + 1, total + 1):
            state, terms = lanes.advance(state)
            pending.append((step, terms))
            bar.update(1)
            epoch = epoch_of_step(step, per_epoch)
            epoch_end = step % per_epoch == 0
            stopping = stop is not None and stop.requested()
            log_now = step % settings.train.log_every_steps == 0 or epoch_end
            save_now = epoch_end or (every and step % every == 0) or stopping
            if log_now or save_now:
                fold_terms = _check_finite(lanes, pending)
                pending = []
            if log_now:
                now = time.perf_counter()
                img_s = (step - tick_step) * images_per_step / max(now - tick, 1e-9)
                tick, tick_step = now, step
                for fold, terms in zip(folds, fold_terms):
                    fold.logger.write({"split": "train", "step": step, "epoch": epoch,
                                       "images_per_s": img_s,
                                       "process_cpu_s": time.process_time(),
                                       **{k: v for k, v in terms.items() if k != "epoch"}})
                bar.set_postfix_str(f"epoch {epoch + 1}/{settings.train.epochs} "
                                    f"{folds[0].prefix(_format_losses(fold_terms[0]))} "
                                    f"{img_s:.1f} img/s")
            if epoch_end or save_now:
                fold_states = lanes.fold_states(state)
            for i, fold in enumerate(folds):
                val_bacc = None
                if epoch_end:
                    last_tests[i], val_bacc = _evaluate_epoch(fold, fold_states[i], step, bar)
                if save_now:
                    # One replicated copy of the state (also under pmap), the same iterator
                    # state on every process (each counts its own rows of the global
                    # batches).
                    saved = (step, run.parallel.get_state(fold_states[i]),
                             fold.batches.get_state(),
                             {"epoch": step / per_epoch, "config": fold.settings.to_dict(),
                              "class_names": list(fold.trainer.data.class_names),
                              "process_count": jax.process_count()})
                    fold.checkpoints.save(*saved)
                    if fold.best is not None and val_bacc is not None:
                        fold.best.save(*saved, metrics={"val_bacc": val_bacc, "epoch": epoch})
            if stopping:
                for fold in folds:
                    fold.wait()
                where = ", ".join(fold.checkpoints.directory for fold in folds)
                raise Preempted(
                    f"stopped by {stop.signal_name} after step {step} of {total}: checkpoint "
                    f"step {step} saved in {where}; run the same command again to resume"
                    + (" (it evaluates and reports the finished run)" if step == total
                       else ""))
        if pending:
            _check_finite(lanes, pending)
    finally:
        bar.close()
    return state, last_tests


def _check_finite(lanes: _Lanes, pending: list) -> list[dict[str, float]]:
    """Reads the metrics of the `pending` steps from the devices (all were queued before the
    first is read) and returns each fold's of the last step; raises TrainingDiverged at the
    first step with a non-finite loss (naming the fold, side by side)."""
    run = lanes.run
    values = jax.device_get([run.parallel.get_outputs(t) for _, t in pending])
    for (step, _), metrics in zip(pending, values):
        fold_terms = lanes.fold_metrics(metrics)
        for fold, terms in zip(lanes.folds, fold_terms):
            if all(math.isfinite(terms[k]) for k in LOSS_KEYS):
                continue
            latest = fold.checkpoints.latest_step()
            kept = (f"the last good checkpoint is step {latest} in "
                    f"{fold.checkpoints.directory}" if latest is not None
                    else "no checkpoint was written before it")
            raise TrainingDiverged(fold.prefix(
                f"non-finite loss at step {step} "
                f"(epoch {epoch_of_step(step, run.steps_per_epoch)}): "
                f"{_format_losses(terms)}; {kept}"))
    return fold_terms


def _evaluate_epoch(fold: _Fold, state, step: int, bar):
    """Evaluates and logs every split and model of `fold`; returns the student's test
    evaluation and validation balanced accuracy (None without a validation split)."""
    trainer = fold.trainer
    epoch = epoch_of_step(step, trainer.run.steps_per_epoch)
    models = ["student"] + (["teacher"] if trainer.run.settings.train.eval_teacher else [])
    student_test, student_val_bacc = None, None
    for split in trainer.eval_splits:
        for model in models:
            out = trainer.evaluate(state, split, use_teacher=model == "teacher")
            values = trainer.scores(out)
            fold.logger.write({"split": split, "model": model, "step": step, "epoch": epoch,
                               **values})
            if split == "val" and model == "student":
                student_val_bacc = values["bacc"]
            if split == "test" and model == "student":
                student_test = out
                if jax.process_index() == 0:
                    bar.write(fold.prefix(
                        f"epoch {epoch + 1}: test bacc={values['bacc']:.4f} "
                        f"f1={values['f1']:.4f} auc={values['auc_ovr']:.4f}"))
    return student_test, student_val_bacc


def _finish(fold: _Fold, state, evaluation, log) -> dict:
    trainer, folder, logger = fold.trainer, fold.folder, fold.logger
    records = read_records(logger.path)
    summary = summarise(records)
    if trainer.run.settings.train.eval_teacher:
        summary["teacher"] = summarise(records, "teacher")
    if evaluation is None:  # the run was complete before this call
        evaluation = trainer.evaluate(state, "test")
    # the final student's test embeddings: how well they separate the classes
    summary["embedding"] = class_separation(evaluation["features"], evaluation["labels"])
    if jax.process_index() == 0:
        folder.write_json(SUMMARY_FILE, summary)
        if trainer.run.settings.train.write_report:
            from crckd_jax import report  # matplotlib and t-SNE: only when a report is written

            report.write_report(folder.path("report"), records, evaluation,
                                list(trainer.data.class_names))
    logger.close()
    final = summary["final"]
    if final:
        log(fold.prefix(f"test (final epoch): {format_metrics(final)}"))
    return summary
