"""A run with its data: the built run of one fold (`builder.build_run`) and the prepared fold's
input pipelines (`Trainer`, `build_trainer`), and a trained run's state from its checkpoints
(`load_trained`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import grain
import jax
import numpy as np

from crckd_jax import builder, metrics, runlock, xla_options
from crckd_jax.builder import DataDescription, Run
from crckd_jax.checkpoint import restore_read_only
from crckd_jax.data import pipeline, prepare
from crckd_jax.errors import CheckpointUnavailable
from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings


def load_data(settings: Settings, data_dir: str, log: Callable[[str], None],
              prepare_missing: bool = True) -> prepare.FoldData:
    """The prepared fold, preparing the data set first when `data_dir` has none or the
    source changed since it was prepared (`prepare.stale_reason`); without
    `prepare_missing`, the prepared set as it is (DataError naming the folder if none).

    With several processes (sharing `data_dir`) process 0 prepares, the others wait; so do
    the processes of `--share_workdir`.
    """
    if prepare_missing and jax.process_index() == 0:
        # processes sharing a cv or table workdir: one prepares, the others wait
        with runlock.exclusive(os.path.join(data_dir, "data", "prepare.lock"),
                               f"waiting for another process preparing the data set in "
                               f"{data_dir}", log):
            reason = prepare.stale_reason(settings, data_dir)
            if reason:
                log(f"preparing the data set: {reason}")
                prepare.prepare(settings, data_dir, log=log)
    if prepare_missing and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("crckd_jax:prepared")
    return prepare.load(data_dir, settings.data.fold)


@dataclasses.dataclass
class Trainer:
    """A built run (`run`) and the prepared fold it trains and evaluates on (`data`)."""

    run: Run
    data: prepare.FoldData

    @classmethod
    def build(cls, settings: Settings, data: prepare.FoldData) -> "Trainer":
        description = DataDescription(tuple(data.class_names), data.train_labels,
                                      *data.largest_fold)
        return cls(builder.build_run(settings, description), data)

    def train_dataset(self) -> grain.IterDataset:
        """This process's training batches, on the host (`pipeline.train_dataset`)."""
        s = self.run.settings
        return pipeline.train_dataset(
            self.data, global_batch_size=s.train.batch_size, image_size=s.data.image_size,
            num_epochs=s.train.epochs, seed=s.seed, steps_per_epoch=s.train.steps_per_epoch,
            read_threads=s.data.read_threads, prefetch_batches=s.data.prefetch_batches,
            worker_count=s.data.worker_count, augment_on=s.data.augment,
            keep_partial_batch=s.train.keep_partial_batch, group_size=s.model.bn_group_size)

    def train_batches(self, iterator_state: dict | None = None) -> grain.DatasetIterator:
        """The training batches put on the devices `data.device_prefetch` steps ahead
        (`DataParallel.prefetch`), from `iterator_state` (a checkpoint's) if given."""
        batches = self.run.parallel.prefetch(self.train_dataset(),
                                             self.run.settings.data.device_prefetch)
        if iterator_state is not None:
            batches.set_state(iterator_state)
        return batches

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
        s, parallel = self.run.settings, self.run.parallel
        dataset = pipeline.eval_dataset(
            self.data, split=split, global_batch_size=s.train.batch_size,
            image_size=s.data.image_size, read_threads=s.data.read_threads,
            prefetch_batches=s.data.prefetch_batches, worker_count=s.data.worker_count)
        # Every batch is queued on the devices before any result is read back.
        batches = parallel.prefetch(dataset, s.data.device_prefetch)
        outputs = [{**self.run.eval_step[use_teacher](state, {"image": batch["image"]}),
                    "label": batch["label"], "mask": batch["mask"]}
                   for batch in batches]
        parts = [parallel.gather_examples(out) for out in outputs]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        joined["labels"] = joined.pop("label")
        mask = joined.pop("mask")
        return {k: v[mask] for k, v in joined.items()}


def build_trainer(settings: Settings, data_dir: str, log: Callable[[str], None],
                  prepare_missing: bool = True) -> Trainer:
    """Enables the compilation cache, loads the data, builds the run."""
    xla_options.enable_compilation_cache(settings.train.compilation_cache_dir)
    return Trainer.build(settings, load_data(settings, data_dir, log, prepare_missing))


def load_trained(settings: Settings, folder: RunFolder,
                 log: Callable[[str], None] = print) -> tuple[Trainer, Any, int]:
    """The trainer of `settings`, the newest checkpointed state of `folder` that restores
    and its step (read-only: a damaged newer checkpoint is reported, not moved; a missing
    data set is an error, not prepared)."""
    if not os.path.isdir(folder.checkpoints):
        raise CheckpointUnavailable(f"no checkpoint in {os.path.abspath(folder.checkpoints)}: "
                                    f"train first (--mode train with --workdir {folder.root})")
    trainer = build_trainer(settings, folder.data_dir, log, prepare_missing=False)
    restored = restore_read_only(
        folder.checkpoints, lambda _: trainer.run.abstract_state(), folder.root, log)
    return trainer, trainer.run.parallel.put_state(restored.state), restored.step
