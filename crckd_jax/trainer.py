"""Building a run: the prepared data, model, optimizer, memory and compiled steps of one
fold (`Trainer`, `build_trainer`), and a trained run's state from its checkpoints
(`load_trained`). `train`, `evaluate` and the benchmarks build their runs here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from crckd_jax import config as config_lib
from crckd_jax import losses, metrics, xla_options
from crckd_jax.checkpoint import restore_read_only
from crckd_jax.data import pipeline, prepare
from crckd_jax.errors import CheckpointUnavailable, DataError
from crckd_jax.memory import BankMemory, QueueMemory
from crckd_jax.models.batch_norm import BatchNormSettings
from crckd_jax.models.densenet import CRCKDNet, densenet_config
from crckd_jax.models.networks import Networks
from crckd_jax.models.torch_import import import_densenet, load_state_dict
from crckd_jax.optim import current_learning_rate, make_optimizer
from crckd_jax.parallel import AXIS, DataParallel
from crckd_jax.state import TrainState, create_train_state
from crckd_jax.step import StepConfig, eval_step, make_train_step


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
    """Everything built for one run: networks, optimizer, compiled steps, data."""

    config: ml_collections.ConfigDict
    data: prepare.FoldData
    networks: Networks
    parallel: DataParallel
    steps_per_epoch: int
    total_steps: int
    create_state: Callable[[], TrainState]  # a fresh random state, in one compiled call
    train_step: Callable
    eval_step: dict[bool, Callable]  # use_teacher -> the compiled eval step

    @functools.cached_property
    def initial_state(self) -> TrainState:
        """The state a new run starts from (with the pretrained backbone, if configured).
        Created on first use: a resumed run or an evaluation restores a checkpoint into
        `abstract_state()` instead and never compiles or runs the initialisation."""
        state = self.create_state()
        if self.config.model.pretrained not in ("", "none"):
            state = _with_pretrained(state, self.networks.network, self.config.model.pretrained)
        return state

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and replicated shardings, the target of a checkpoint
        restore; traced from the initialisation (`jax.eval_shape`), not computed."""
        return self.parallel.abstract_state(jax.eval_shape(self.create_state))

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
        networks = Networks(
            CRCKDNet(densenet_config(config.model.name), num_classes,
                     hidden_dim=config.model.hidden_dim, dtype=dtype, bn=bn,
                     double_update_until_block=3 if config.model.reference_double_bn_update
                     else 0),
            embed_dim=config.memory.embed_dim)
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
        create_state = functools.partial(create_train_state, jax.random.key(config.seed),
                                         networks, optimizer, make_memory, (size, size, 3))
        step_config = StepConfig.from_config(config, steps_per_epoch=steps_per_epoch,
                                             axis_name=AXIS)
        class_weight = losses.class_weights(data.class_counts)
        train_fn = make_train_step(networks, optimizer, class_weight, step_config)

        precision = config.train.matmul_precision

        def train_with_lr(state, batch):
            with matmul_precision(precision):
                new_state, out = train_fn(state, batch)
            return new_state, {**out, "learning_rate": current_learning_rate(new_state.opt_state)}

        def eval_fn(state, batch, use_teacher):
            with matmul_precision(precision):
                return eval_step(state, batch, model=networks.network, use_teacher=use_teacher)

        compiled_eval = {
            teacher: parallel.compile(functools.partial(eval_fn, use_teacher=teacher),
                                      donate_state=False, sharded_outputs=True)
            for teacher in (False, True)}
        return cls(config, data, networks, parallel, steps_per_epoch, total_steps,
                   create_state, parallel.compile(train_with_lr), compiled_eval)

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


def matmul_precision(precision: str):
    """The context that traces a step at `train.matmul_precision`: 'default' leaves float32
    convolutions and matrix products to XLA (TF32 on recent NVIDIA GPUs), 'highest' asks
    for full float32 on every backend."""
    if precision == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def build_trainer(config: ml_collections.ConfigDict, data_workdir: str,
                  log: Callable[[str], None], prepare_missing: bool = True) -> Trainer:
    """Enables the compilation cache, loads the data, builds the run."""
    xla_options.enable_compilation_cache(config.train.compilation_cache_dir)
    return Trainer.build(config, load_data(config, data_workdir, log, prepare_missing))


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
    trainer = build_trainer(config, data_workdir or workdir, log, prepare_missing=False)
    restored = restore_read_only(
        directory, lambda _: trainer.abstract_state(), workdir, log)
    return trainer, trainer.parallel.put_state(restored.state)
