"""The training loop of one fold: epochs, evaluation, checkpoints, logs, progress, NaN guard.

`train_and_evaluate(config, workdir)` prepares the data if needed, builds the model, the
optimizer, the memory and one `TrainState`, resumes from the latest checkpoint in
`<workdir>/checkpoints` if there is one, trains with the compiled data-parallel step,
evaluates the student (and optionally the teacher) on the held-out fold after every epoch,
and writes `summary.json` and the report figures. Running it again on the same workdir
continues where it stopped and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import grain
import ml_collections
import numpy as np
from tqdm import tqdm

from crckd_jax import config as config_lib
from crckd_jax import losses, metrics, xla_options
from crckd_jax.checkpoint import BEST_DIR, Checkpointer, restore_read_only
from crckd_jax.errors import (CheckpointUnavailable, ConfigChanged, Preempted, StorageError,
                              TrainingDiverged)
from crckd_jax.preemption import StopRequest
from crckd_jax.data import pipeline, prepare
from crckd_jax.errors import DataError
from crckd_jax.logger import MetricLogger, read_records
from crckd_jax.memory import BankMemory, QueueMemory
from crckd_jax.models.batch_norm import BatchNormSettings
from crckd_jax.models.densenet import CRCKDNet, densenet_config
from crckd_jax.models.torch_import import import_densenet, load_state_dict
from crckd_jax.metrics import METRIC_KEYS
from crckd_jax.objective import LOSS_KEYS
from crckd_jax.optim import current_learning_rate, make_optimizer
from crckd_jax.parallel import AXIS, DataParallel
from crckd_jax.state import TrainState, create_train_state
from crckd_jax.step import StepConfig, eval_step, make_train_step

# Epochs averaged by the reference's protocol: its test metrics of every epoch with
# (epoch + 1) >= epochs - 10 (0-based epoch), i.e. the last 11, though its log says 10.
MEAN_LAST = 11
MEAN_VIEW = f"mean_last_{MEAN_LAST}"
SUMMARY_VIEWS = ("final", MEAN_VIEW, "best_val")  # the views of `summarise`, in order




def load_data(config: ml_collections.ConfigDict, data_workdir: str,
              log: Callable[[str], None], prepare_missing: bool = True) -> prepare.FoldData:
    """The prepared fold, preparing the data set first when `data_workdir` has none (or,
    without `prepare_missing`, DataError naming the folder).

    With several processes (sharing `data_workdir`) process 0 prepares, the others wait.
    """
    if not prepare_missing:
        return prepare.load(data_workdir, config.data.fold)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            _load_or_prepare(config, data_workdir, log)
        multihost_utils.sync_global_devices("crckd_jax:prepared")
        return prepare.load(data_workdir, config.data.fold)
    return _load_or_prepare(config, data_workdir, log)


def _load_or_prepare(config, data_workdir, log):
    try:
        return prepare.load(data_workdir, config.data.fold)
    except DataError:
        prepare.prepare(config, data_workdir, log=log)
        return prepare.load(data_workdir, config.data.fold)


@dataclasses.dataclass
class Trainer:
    """Everything built for one run: model, optimizer, compiled steps, data."""

    config: ml_collections.ConfigDict
    data: prepare.FoldData
    model: CRCKDNet
    parallel: DataParallel
    steps_per_epoch: int
    total_steps: int
    initial_state: TrainState
    train_step: Callable
    eval_step: dict[bool, Callable]  # use_teacher -> the compiled eval step

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, data: prepare.FoldData) -> "Trainer":
        num_classes = len(data.class_names)
        parallel = DataParallel(config.parallel.backend)
        if config.train.batch_size % parallel.num_devices:
            raise config_lib.ConfigError(
                f"config key 'train.batch_size' is {config.train.batch_size}: expected a "
                f"multiple of the {parallel.num_devices} devices")
        group = config.model.bn_group_size
        per_device = config.train.batch_size // parallel.num_devices
        if group and per_device % group:
            raise config_lib.ConfigError(
                f"config key 'model.bn_group_size' is {group}: expected a divisor of the "
                f"per-device batch ({config.train.batch_size} / {parallel.num_devices} "
                f"devices = {per_device}); BatchNorm groups cannot span devices")
        dtype = jnp.bfloat16 if config.train.dtype == "bfloat16" else jnp.float32
        bn = BatchNormSettings(axis_name=AXIS if config.parallel.sync_batch_norm else None,
                               group_size=group)
        model = CRCKDNet(densenet_config(config.model.name), num_classes,
                         hidden_dim=config.model.hidden_dim, dtype=dtype, bn=bn,
                         double_update_until_block=3 if config.model.reference_double_bn_update
                         else 0)
        steps_per_epoch = config.train.steps_per_epoch or pipeline.steps_per_pass(
            len(data.fold.train), config.train.batch_size, config.train.keep_partial_batch)
        total_steps = steps_per_epoch * config.train.epochs
        optimizer = make_optimizer(
            total_steps, max_lr=config.optim.max_lr, weight_decay=config.optim.weight_decay,
            reset_lr_every=steps_per_epoch if config.optim.reset_lr_each_epoch else 0,
            reset_lr=config.optim.learning_rate)
        mem = config.memory
        if mem.kind == "queue":
            make_memory = functools.partial(QueueMemory.create, num_classes=num_classes,
                                            capacity=mem.queue_size, dim=mem.embed_dim)
        else:
            make_memory = functools.partial(BankMemory.create, train_labels=data.train_labels,
                                            num_classes=num_classes, dim=mem.embed_dim)
        size = config.data.image_size
        state = create_train_state(jax.random.key(config.seed), model, optimizer,
                                   make_memory, (size, size, 3), mem.embed_dim)
        if config.model.pretrained not in ("", "none"):
            state = _with_pretrained(state, model, config.model.pretrained)
        step_config = StepConfig.from_config(config, steps_per_epoch=steps_per_epoch,
                                             axis_name=AXIS)
        class_weight = losses.class_weights(data.class_counts)
        train_fn = make_train_step(model, optimizer, class_weight, step_config)

        precision = config.train.matmul_precision

        def train_with_lr(state, batch):
            with matmul_precision(precision):
                new_state, out = train_fn(state, batch)
            return new_state, {**out, "learning_rate": current_learning_rate(new_state.opt_state)}

        def eval_fn(state, batch, use_teacher):
            with matmul_precision(precision):
                return eval_step(state, batch, model=model, use_teacher=use_teacher)

        compiled_eval = {
            teacher: parallel.compile(functools.partial(eval_fn, use_teacher=teacher),
                                      donate_state=False, sharded_outputs=True)
            for teacher in (False, True)}
        return cls(config, data, model, parallel, steps_per_epoch, total_steps, state,
                   parallel.compile(train_with_lr), compiled_eval)

    def train_dataset(self) -> grain.IterDataset:
        """The training batches of this process, on the host (`pipeline.train_dataset`)."""
        c = self.config
        return pipeline.train_dataset(
            self.data, global_batch_size=c.train.batch_size, image_size=c.data.image_size,
            num_epochs=c.train.epochs, seed=c.seed, steps_per_epoch=c.train.steps_per_epoch,
            read_threads=c.data.read_threads, prefetch_batches=c.data.prefetch_batches,
            worker_count=c.data.worker_count, augment_on=c.data.augment,
            keep_partial_batch=c.train.keep_partial_batch, group_size=c.model.bn_group_size)

    @property
    def eval_splits(self) -> list[str]:
        """'test', and 'val' when the fold has a validation part."""
        return ["test"] + (["val"] if len(self.data.fold.val) else [])

    def scores(self, evaluation: dict[str, np.ndarray]) -> dict[str, float]:
        """The metrics of an `evaluate` result."""
        return metrics.classification_metrics(evaluation["probs"], evaluation["labels"],
                                              len(self.data.class_names))

    def evaluate(self, state, split: str, use_teacher: bool = False) -> dict[str, np.ndarray]:
        """probs [N, C], labels [N], features [N, F] of every item of `split`, once each."""
        c = self.config
        dataset = pipeline.eval_dataset(
            self.data, split=split, global_batch_size=c.train.batch_size,
            image_size=c.data.image_size, read_threads=c.data.read_threads,
            prefetch_batches=c.data.prefetch_batches, worker_count=c.data.worker_count)
        # Every batch is queued on the devices before any result is read back.
        batches = self.parallel.prefetch(dataset, c.data.device_prefetch)
        outputs = [{**self.eval_step[use_teacher](state, {"image": batch["image"]}),
                    "label": batch["label"], "mask": batch["mask"]}
                   for batch in batches]
        parts = [self.parallel.gather_examples(out) for out in outputs]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        joined["labels"] = joined.pop("label")
        mask = joined.pop("mask")
        return {k: v[mask] for k, v in joined.items()}


def _with_pretrained(state: TrainState, model: CRCKDNet, path: str) -> TrainState:
    """Student and teacher backbones from a torchvision DenseNet checkpoint; each keeps its
    own freshly initialised head (the reference builds both networks from the checkpoint)."""
    state_dict = load_state_dict(path)
    load = lambda params, stats: import_densenet(  # noqa: E731
        state_dict, {"params": params, "batch_stats": stats}, name=f"model {model.config}")
    student = load(state.params["student"], state.batch_stats)
    # Copied: both imports may wrap the same checkpoint arrays, and the step donates the
    # state (a buffer shared by two leaves would be donated twice).
    teacher = jax.tree.map(jnp.copy, load(state.ema_params, state.ema_batch_stats))
    return state.replace(
        params={**state.params, "student": student["params"]},
        batch_stats=student["batch_stats"], ema_params=teacher["params"],
        ema_batch_stats=teacher["batch_stats"])


def summarise(records: list[dict], model: str = "student") -> dict:
    """The views of the test metrics (`SUMMARY_VIEWS`): final epoch, mean of the last 11
    epochs (the reference's average), and the epoch with the best validation balanced
    accuracy (None without a validation split)."""
    test = [r for r in records if r["split"] == "test" and r.get("model") == model]
    if not test:
        return dict.fromkeys(SUMMARY_VIEWS)
    pick = lambda r: {k: r[k] for k in METRIC_KEYS}
    last = test[-MEAN_LAST:]
    view = {
        "final": pick(test[-1]),
        MEAN_VIEW: {k: float(np.mean([r[k] for r in last])) for k in METRIC_KEYS},
        "best_val": None,
    }
    val = [r for r in records if r["split"] == "val" and r.get("model") == model]
    if val:
        best = max(val, key=lambda r: (r["bacc"], -r["epoch"]))
        match = [r for r in test if r["epoch"] == best["epoch"]]
        view["best_val"] = {**pick(match[0]), "epoch": best["epoch"]}
    return view


def _format_metrics(terms: dict) -> str:
    return " ".join(f"{k}={terms[k]:.4g}" for k in LOSS_KEYS if k in terms)


def matmul_precision(precision: str):
    """The context that traces a step at `train.matmul_precision`: 'default' leaves float32
    convolutions and matrix products to XLA (TF32 on recent NVIDIA GPUs), 'highest' asks
    for full float32 on every backend."""
    if precision == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def _trainer(config: ml_collections.ConfigDict, data_workdir: str,
             log: Callable[[str], None], prepare_missing: bool = True) -> Trainer:
    """Enables the compilation cache, loads the data, builds the run."""
    xla_options.enable_compilation_cache(config.train.compilation_cache_dir)
    return Trainer.build(config, load_data(config, data_workdir, log, prepare_missing))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data_workdir: str | None = None,
                       log: Callable[[str], None] = print,
                       allow_config_change: bool = False) -> dict:
    """Trains one fold in `workdir` (resuming if possible); returns the summary dict.

    `data_workdir` holds the prepared data set and folds (default: `workdir`). The run's
    config is written to `<workdir>/config.json`; resuming with a config that differs in a
    computation-changing key raises ConfigChanged before anything is restored, unless
    `allow_config_change`. On SIGTERM/SIGINT the run saves a checkpoint at the step it
    reached and raises Preempted. `config` has passed `config.validate`.
    """
    config_lib.require_initialisation(config)
    os.makedirs(workdir, exist_ok=True)
    checkpoints_dir = os.path.join(workdir, "checkpoints")
    _check_config_change(config, workdir, checkpoints_dir, allow_config_change, log)
    trainer = _trainer(config, data_workdir or workdir, log)
    checkpoints = Checkpointer(checkpoints_dir, keep=config.train.keep_checkpoints)
    best = (Checkpointer(os.path.join(workdir, BEST_DIR), keep=1, best=True)
            if "val" in trainer.eval_splits else None)
    for opened in filter(None, (checkpoints, best)):
        if opened.removed_leftovers:
            log(f"removed the unfinished save(s) of an interrupted run: "
                f"{', '.join(opened.removed_leftovers)} ({opened.directory})")
    logger, batches, failed = None, None, True
    try:
        restored = None
        if checkpoints.latest_step() is not None:
            restored = checkpoints.restore_newest_good(
                trainer.parallel.abstract_state(trainer.initial_state), log=log)
            if restored is None:
                raise CheckpointUnavailable(
                    f"no checkpoint in {checkpoints.directory} can be restored with this config "
                    f"({checkpoints.failure}); check that the config fits the run, or move the "
                    "checkpoints folder away to start from scratch")
        if jax.process_index() == 0:
            _write(lambda: config_lib.write_config_file(config, workdir),
                   os.path.join(workdir, config_lib.CONFIG_FILE))
        start = restored.step if restored else 0
        logger = MetricLogger(workdir, purge_after=start)
        batches = trainer.parallel.prefetch(trainer.train_dataset(),
                                            config.data.device_prefetch)
        if restored:
            state = trainer.parallel.put_state(restored.state)
            batches.set_state(pipeline.rescale_iterator_state(
                restored.data, config.train.batch_size,
                restored.meta.get("process_count", jax.process_count())))
            log(f"resumed from step {start} ({checkpoints.directory})")
        else:
            state = trainer.parallel.put_state(trainer.initial_state)
        logger.truncate_after(start)
        with StopRequest() as stop:
            state, last_test = _train_loop(trainer, state, batches, start, checkpoints,
                                           logger, stop, best)
        checkpoints.wait()
        if best is not None:
            best.wait()
        summary = _finish(trainer, state, last_test, workdir, logger, log)
        failed = False
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
            if batches is not None:
                batches.close()
            if logger is not None:
                logger.close()
            checkpoints.close()
            if best is not None:
                best.close()


def _write(write: Callable[[], Any], path: str) -> Any:
    """`write()`, an OSError of which becomes StorageError naming `path`."""
    try:
        return write()
    except OSError as e:
        raise StorageError(f"cannot write {getattr(e, 'filename', None) or path}: "
                           f"{e.strerror or e}") from None


def _check_config_change(config, workdir, checkpoints_dir, allow, log) -> None:
    """ConfigChanged when `workdir` has checkpoints and a config.json whose computation-
    changing keys differ from `config` (nothing is restored or written before)."""
    if not os.path.isdir(checkpoints_dir) or not any(
            p.isdigit() for p in os.listdir(checkpoints_dir)):
        return
    old = config_lib.read_config_file(workdir)
    if old is None:
        return
    changes = config_lib.config_changes(old, config)
    if not changes:
        return
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
    if allow:
        log(f"warning: resuming with a changed config (--allow_config_change): {listing}")
        return
    raise ConfigChanged(
        f"the config differs from the one this run was started with "
        f"({os.path.join(workdir, config_lib.CONFIG_FILE)}) in {len(changes)} key(s) that "
        f"change the computation: {listing}. Resume with the same config, use a new "
        f"--workdir, or pass --allow_config_change to resume with the new values")


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
    config = trainer.config
    per_epoch, total = trainer.steps_per_epoch, trainer.total_steps
    every = config.train.checkpoint_every_steps
    bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0,
               unit="step", dynamic_ncols=True)
    pending = []  # (step, metrics still on the devices) since the last read
    tick, tick_step = time.perf_counter(), start
    last_test = None
    for step in range(start + 1, total + 1):
        batch = next(batches)
        state, terms = trainer.train_step(state, batch)
        pending.append((step, terms))
        bar.update(1)
        epoch_end = step % per_epoch == 0
        stopping = stop is not None and step < total and stop.reached(step)
        log_now = step % config.train.log_every_steps == 0 or epoch_end
        save_now = epoch_end or (every and step % every == 0) or stopping
        if log_now or save_now:
            terms = _check_finite(trainer, pending, checkpoints)
            pending = []
        if log_now:
            now = time.perf_counter()
            img_s = (step - tick_step) * config.train.batch_size / max(now - tick, 1e-9)
            tick, tick_step = now, step
            logger.write({"split": "train", "step": step, "epoch": (step - 1) // per_epoch,
                          "images_per_s": img_s, "process_cpu_s": time.process_time(),
                          **{k: v for k, v in terms.items() if k != "epoch"}})
            bar.set_postfix_str(f"epoch {(step - 1) // per_epoch + 1}/{config.train.epochs} "
                                f"{_format_metrics(terms)} {img_s:.1f} img/s")
        val_bacc = None
        if epoch_end:
            last_test, val_bacc = _evaluate_epoch(trainer, state, step, logger, bar)
        if save_now:
            # One replicated copy of the state (also under pmap), the same iterator
            # state on every process (each counts its own rows of the global batches).
            saved = (step, trainer.parallel.get_state(state), batches.get_state(),
                     {"epoch": step / per_epoch, "config": config.to_dict(),
                      "class_names": list(trainer.data.class_names),
                      "process_count": jax.process_count()})
            checkpoints.save(*saved)
            if best is not None and val_bacc is not None:
                best.save(*saved, metrics={"val_bacc": val_bacc,
                                           "epoch": step // per_epoch - 1})
        if stopping:
            checkpoints.wait()
            if best is not None:
                best.wait()
            bar.close()
            raise Preempted(
                f"stopped by {stop.signal_name} after step {step} of {total}: checkpoint "
                f"step {step} saved in {checkpoints.directory}; run the same command again "
                "to resume")
    if pending:
        _check_finite(trainer, pending, checkpoints)
    bar.close()
    return state, last_test


def _check_finite(trainer, pending, checkpoints) -> dict[str, float]:
    """Reads the metrics of the `pending` steps from the devices (all were queued before the
    first is read) and returns the last step's; raises TrainingDiverged at the first step
    with a non-finite loss."""
    values = jax.device_get([trainer.parallel.get_outputs(t) for _, t in pending])
    for (step, _), terms in zip(pending, values):
        terms = {k: float(v) for k, v in terms.items()}
        if not all(math.isfinite(terms[k]) for k in LOSS_KEYS):
            latest = checkpoints.latest_step()
            kept = (f"the last good checkpoint is step {latest} in {checkpoints.directory}"
                    if latest is not None else "no checkpoint was written before it")
            raise TrainingDiverged(
                f"non-finite loss at step {step} (epoch {(step - 1) // trainer.steps_per_epoch}"
                f"): {_format_metrics(terms)}; {kept}")
    return terms


def _evaluate_epoch(trainer, state, step, logger, bar):
    """Evaluates and logs every split and model; returns the student's test evaluation and
    validation balanced accuracy (None without a validation split)."""
    epoch = step // trainer.steps_per_epoch - 1
    models = ["student"] + (["teacher"] if trainer.config.train.eval_teacher else [])
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


def _finish(trainer, state, evaluation, workdir, logger, log):
    records = read_records(logger.path)
    summary = summarise(records)
    if trainer.config.train.eval_teacher:
        summary["teacher"] = summarise(records, "teacher")
    if evaluation is None:  # the run was complete before this call
        evaluation = trainer.evaluate(state, "test")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        from crckd_jax import report  # matplotlib and t-SNE: only when a report is written

        report.write_report(os.path.join(workdir, "report"), records, evaluation,
                            list(trainer.data.class_names))
    logger.close()
    final = summary["final"]
    if final:
        log(f"test (final epoch): " + " ".join(f"{k}={final[k]:.4f}" for k in METRIC_KEYS))
    return summary


def load_trained(config: ml_collections.ConfigDict, workdir: str,
                 data_workdir: str | None = None,
                 log: Callable[[str], None] = print) -> tuple[Trainer, Any]:
    """The trainer of `config` and the newest checkpointed state of `workdir` that restores
    (read-only: a damaged newer checkpoint is reported, not moved; a missing data set is
    an error, not prepared)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointUnavailable(f"no checkpoint in {os.path.abspath(directory)}: train "
                                    f"first (--mode train with --workdir {workdir})")
    trainer = _trainer(config, data_workdir or workdir, log, prepare_missing=False)
    restored = restore_read_only(
        directory, lambda _: trainer.parallel.abstract_state(trainer.initial_state), workdir,
        log)
    return trainer, trainer.parallel.put_state(restored.state)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        log: Callable[[str], None] = print) -> dict:
    """Metrics of the latest checkpoint on the test (and validation) split -> eval.json."""
    trainer, state = load_trained(config, workdir, log=log)
    results = {}
    for split in trainer.eval_splits:
        out = trainer.evaluate(state, split)
        results[split] = trainer.scores(out)
        log(f"{split}: " + " ".join(f"{k}={results[split][k]:.4f}" for k in METRIC_KEYS))
        log(metrics.per_class_report(out["probs"], out["labels"], trainer.data.class_names))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results
