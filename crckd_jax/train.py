"""The training loop of one fold: epochs, evaluation, checkpoints, logs, progress, NaN guard.

`train_and_evaluate(settings, folder)` prepares the data if needed, builds the model, the
optimizer, the memory and one `TrainState`, resumes from the latest checkpoint in
`<W>/checkpoints` if there is one, trains with the compiled data-parallel step,
evaluates the student (and optionally the teacher) on the held-out fold after every epoch,
and writes `summary.json` and the report figures. Running it again on the same run folder
continues where it stopped and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import jax
from tqdm import tqdm

from crckd_jax import builder
from crckd_jax.checkpoint import Checkpointer
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
from crckd_jax.trainer import build_trainer


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
    logger, batches, failed = None, None, True
    parallel = trainer.run.parallel
    try:
        restored = None
        if checkpoints.latest_step() is not None:
            restored = checkpoints.restore_newest_good(trainer.run.abstract_state(), log=log)
            if restored is None:
                raise CheckpointUnavailable(
                    f"no checkpoint in {checkpoints.directory} can be restored with this config "
                    f"({checkpoints.failure}); check that the config fits the run, or move the "
                    "checkpoints folder away to start from scratch")
        if jax.process_index() == 0:
            folder.write_config(settings)
        start = restored.step if restored else 0
        logger = MetricLogger(folder.root, purge_after=start)
        if restored:
            state = parallel.put_state(restored.state)
            batches = trainer.train_batches(pipeline.rescale_iterator_state(
                restored.data, settings.train.batch_size,
                restored.meta.get("process_count", jax.process_count())))
            log(f"resumed from step {start} ({checkpoints.directory})")
        else:
            state = parallel.put_state(trainer.run.initial_state)
            batches = trainer.train_batches()
        logger.truncate_after(start)
        with StopRequest() as stop:
            state, last_test = _train_loop(trainer, state, batches, start, checkpoints,
                                           logger, stop, best)
            checkpoints.wait()
            if best is not None:
                best.wait()
            summary = _finish(trainer, state, last_test, folder, logger, log)
        failed = False
        if stop.requested():  # arrived while the finished run was evaluated and reported
            raise Preempted(
                f"stopped by {stop.signal_name} after the run ended: its checkpoint and "
                f"summary are saved in {folder.root}; nothing further is run")
        return summary
    finally:
        # Every exit path: the pending save ends (its error, if any, only when nothing else
        # failed), the TensorBoard writer's thread stops, the manager closes.
        try:
            for opened in filter(None, (checkpoints, best)):
                opened.wait()
        except StorageError:
            if not failed:
                raise
        finally:
            closers = [getattr(opened, "close", None)
                       for opened in (batches, logger, checkpoints, best)]
            _close_all(closers, failed)


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


def _train_loop(trainer, state, batches, start, checkpoints, logger, stop=None, best=None):
    """Steps `start + 1 .. total` on `batches` (`DataParallel.prefetch`'s iterator); returns
    the state and the last epoch's student test evaluation (None when no step was left).
    `best` (a Checkpointer with `best=True`) gets every epoch's state with the student's
    validation balanced accuracy and keeps the best.

    The host never waits for a step: batches are put on the devices ahead of their step
    (`data.device_prefetch`, by a background thread), the steps' metrics stay on the
    devices and are read together every `train.log_every_steps` steps, at epoch ends and
    before each checkpoint (`_check_finite`: a non-finite loss stops the run before
    anything after it is saved).
    `stop` (a StopRequest) is asked once per step; when it says so, the step's checkpoint
    is saved and committed and Preempted is raised.
    """
    settings, run = trainer.run.settings, trainer.run
    per_epoch, total = run.steps_per_epoch, run.total_steps
    every = settings.train.checkpoint_every_steps
    bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0,
               unit="step", dynamic_ncols=True)
    pending = []  # (step, metrics still on the devices) since the last read
    tick, tick_step = time.perf_counter(), start
    last_test = None
    try:  # the bar ends its line before any error is printed
        for step in range(start + 1, total + 1):
            batch = next(batches)
            state, terms = run.train_step(state, batch, run.step_class_weight)
            pending.append((step, terms))
            bar.update(1)
            epoch = epoch_of_step(step, per_epoch)
            epoch_end = step % per_epoch == 0
            stopping = stop is not None and stop.requested()
            log_now = step % settings.train.log_every_steps == 0 or epoch_end
            save_now = epoch_end or (every and step % every == 0) or stopping
            if log_now or save_now:
                terms = _check_finite(trainer, pending, checkpoints)
                pending = []
            if log_now:
                now = time.perf_counter()
                img_s = (step - tick_step) * settings.train.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, step
                logger.write({"split": "train", "step": step, "epoch": epoch,
                              "images_per_s": img_s, "process_cpu_s": time.process_time(),
                              **{k: v for k, v in terms.items() if k != "epoch"}})
                bar.set_postfix_str(f"epoch {epoch + 1}/{settings.train.epochs} "
                                    f"{_format_losses(terms)} {img_s:.1f} img/s")
            val_bacc = None
            if epoch_end:
                last_test, val_bacc = _evaluate_epoch(trainer, state, step, logger, bar)
            if save_now:
                # One replicated copy of the state (also under pmap), the same iterator
                # state on every process (each counts its own rows of the global batches).
                saved = (step, run.parallel.get_state(state), batches.get_state(),
                         {"epoch": step / per_epoch, "config": settings.to_dict(),
                          "class_names": list(trainer.data.class_names),
                          "process_count": jax.process_count()})
                checkpoints.save(*saved)
                if best is not None and val_bacc is not None:
                    best.save(*saved, metrics={"val_bacc": val_bacc, "epoch": epoch})
            if stopping:
                checkpoints.wait()
                if best is not None:
                    best.wait()
                raise Preempted(
                    f"stopped by {stop.signal_name} after step {step} of {total}: checkpoint "
                    f"step {step} saved in {checkpoints.directory}; run the same command again "
                    "to resume" + (" (it evaluates and reports the finished run)"
                                   if step == total else ""))
        if pending:
            _check_finite(trainer, pending, checkpoints)
    finally:
        bar.close()
    return state, last_test


def _check_finite(trainer, pending, checkpoints) -> dict[str, float]:
    """Reads the metrics of the `pending` steps from the devices (all were queued before the
    first is read) and returns the last step's; raises TrainingDiverged at the first step
    with a non-finite loss."""
    values = jax.device_get([trainer.run.parallel.get_outputs(t) for _, t in pending])
    for (step, _), terms in zip(pending, values):
        terms = {k: float(v) for k, v in terms.items()}
        if not all(math.isfinite(terms[k]) for k in LOSS_KEYS):
            latest = checkpoints.latest_step()
            kept = (f"the last good checkpoint is step {latest} in {checkpoints.directory}"
                    if latest is not None else "no checkpoint was written before it")
            raise TrainingDiverged(
                f"non-finite loss at step {step} "
                f"(epoch {epoch_of_step(step, trainer.run.steps_per_epoch)}): "
                f"{_format_losses(terms)}; {kept}")
    return terms


def _evaluate_epoch(trainer, state, step, logger, bar):
    """Evaluates and logs every split and model; returns the student's test evaluation and
    validation balanced accuracy (None without a validation split)."""
    epoch = epoch_of_step(step, trainer.run.steps_per_epoch)
    models = ["student"] + (["teacher"] if trainer.run.settings.train.eval_teacher else [])
    student_test, student_val_bacc = None, None
    for split in trainer.eval_splits:
        for model in models:
            out = trainer.evaluate(state, split, use_teacher=model == "teacher")
            values = trainer.scores(out)
            logger.write({"split": split, "model": model, "step": step, "epoch": epoch,
                          **values})
            if split == "val" and model == "student":
                student_val_bacc = values["bacc"]
            if split == "test" and model == "student":
                student_test = out
                if jax.process_index() == 0:
                    bar.write(f"epoch {epoch + 1}: test bacc={values['bacc']:.4f} "
                              f"f1={values['f1']:.4f} auc={values['auc_ovr']:.4f}")
    return student_test, student_val_bacc


def _finish(trainer, state, evaluation, folder, logger, log):
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
        log(f"test (final epoch): {format_metrics(final)}")
    return summary
