"""Building a run from its settings and a description of its data, without the data.

`build_run(settings, data)` returns the networks, the optimizer, the state's creation (and
its traced shapes) and the compiled train and eval steps of one fold. Training, evaluation,
export, cross-validation, the benchmarks and the parity check of the train step all build
their step here, so what a benchmark times is the program the trainer runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crckd_jax import losses
from crckd_jax.data.pipeline import steps_per_pass
from crckd_jax.errors import ConfigError
from crckd_jax.memory import BankMemory, QueueMemory
from crckd_jax.models.batch_norm import BatchNormSettings
from crckd_jax.models.densenet import CRCKDNet, densenet_config
from crckd_jax.models.kernels import resolve_kernels
from crckd_jax.models.networks import Networks
from crckd_jax.models.torch_import import import_densenet, load_state_dict
from crckd_jax.optim import current_learning_rate, make_optimizer
from crckd_jax.parallel import AXIS, DataParallel
from crckd_jax.settings import Settings
from crckd_jax.state import TrainState, create_train_state
from crckd_jax.step import StepConfig, eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class DataDescription:
    """What building a run needs to know of its data.

    class_names: the C classes, in label order. train_labels: int [N] the class of every
    training item of the fold, in data set index order (the bank memory has one row per
    item; class counts and the epoch length follow from it). memory_rows,
    memory_class_rows: the bank memory's rows and per-class sampling bound, at least N and
    the largest class count (0: exactly those); the largest over the data set's folds
    give every fold the same shapes, hence one compiled step.
    """

    class_names: tuple[str, ...]
    train_labels: np.ndarray
    memory_rows: int = 0
    memory_class_rows: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        """[C] int64 training items per class."""
        return np.bincount(self.train_labels, minlength=self.num_classes)

    @classmethod
    def from_counts(cls, counts) -> "DataDescription":
        """Classes '0' .. 'C-1' with `counts[c]` training items each, sorted by class."""
        labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
        return cls(tuple(str(c) for c in range(len(counts))), labels)


@dataclasses.dataclass
class Run:
    """The built run of one fold: networks, optimizer, state and compiled steps.

    train_step(state, batch, class_weight) -> (state, metrics incl. 'learning_rate'),
    compiled for every device (`DataParallel`), called with `step_class_weight`;
    folds_train_step(states, batches, class_weights): K folds' steps as one program, the
    states and class weights stacked on a leading fold axis [K, ...], `batches` a tuple of
    K batches, metrics [K] (`jax.vmap` of the same per-device step; split over the fold
    groups of `parallel.fold_axis_size`: `DataParallel.compile_side_by_side`);
    eval_step[use_teacher](state, {'image'}) -> per-example 'probs' [B, C], 'features'
    [B, F]. class_weight: [C] float32, the fold's class weights (an input of the step, so
    that the folds of a data set share its executable).
    """

    settings: Settings
    data: DataDescription
    networks: Networks
    optimizer: optax.GradientTransformation
    parallel: DataParallel
    steps_per_epoch: int
    total_steps: int
    create_state: Callable[[], TrainState]  # a fresh random state, in one compiled call
    train_step: Callable
    folds_train_step: Callable
    eval_step: dict[bool, Callable]
    class_weight: np.ndarray

    @functools.cached_property
    def step_class_weight(self) -> jax.Array:
        """`class_weight` on the devices, in the layout `train_step` takes (put once)."""
        return self.parallel.put_state(self.class_weight)

    @functools.cached_property
    def initial_state(self) -> TrainState:
        """The state a new run starts from (with `model.pretrained`'s backbone, if any).
        Created on first use: a resumed run restores into `abstract_state()` instead."""
        state = self.create_state()
        if self.settings.model.pretrained not in ("", "none"):
            state = _with_pretrained(state, self.networks.network,
                                     self.settings.model.pretrained)
        return state

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global training batch as the input pipeline delivers it
        (`data.augment='device'`): image uint8 [B, S, S, 3], label and index int32 [B], and
        with `train.keep_partial_batch` mask bool [B]; split over the devices (`pmap`:
        [devices, B / devices, ...])."""
        batch, size = self.settings.train.batch_size, self.settings.data.image_size
        fields = {"image": ((size, size, 3), jnp.uint8), "label": ((), jnp.int32),
                  "index": ((), jnp.int32)}
        if self.settings.train.keep_partial_batch:
            fields["mask"] = ((), jnp.bool_)
        if self.parallel.backend == "pmap":
            n = self.parallel.num_devices
            return {k: jax.ShapeDtypeStruct((n, batch // n, *shape), dtype)
                    for k, (shape, dtype) in fields.items()}
        sharding = self.parallel.batch_sharding
        return {k: jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=sharding)
                for k, (shape, dtype) in fields.items()}

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and replicated shardings (a checkpoint's restore
        target), traced from the initialisation, not computed."""
        return self.parallel.abstract_state(jax.eval_shape(self.create_state))

    def abstract_train_inputs(self) -> tuple:
        """(state, batch, class_weight) as shapes, dtypes and shardings: what lowering
        `train_step` without any array needs (the state per device under `pmap`)."""
        state, weight = self.abstract_state(), self.parallel.abstract_state(self.class_weight)
        if self.parallel.backend == "pmap":  # one copy per device
            n = self.parallel.num_devices
            state, weight = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), (state, weight))
        return state, self.abstract_batch(), weight


def build_run(settings: Settings, data: DataDescription, *, kernels: str = "auto",
              devices=None) -> Run:
    """The run of `settings` on data described by `data`, compiled for `devices` (default:
    every device of every process). `kernels`: the model's layer implementations
    (`crckd_jax.models.kernels`). ConfigError when the batch does not fit the devices."""
    devices = list(devices if devices is not None else jax.devices())
    _check_device_layout(settings, len(devices),
                         len({d.process_index for d in devices}))
    parallel = DataParallel(settings.parallel.backend, devices,
                            settings.parallel.fold_axis_size)
    # 'auto' resolved for the devices compiled for (not the default backend: a program
    # compiled here for an accelerator this machine lacks gets the accelerator's layers).
    platform = parallel.mesh.devices.flat[0].platform
    kernels = resolve_kernels(kernels, platform)
    networks = Networks(network(settings, data.num_classes, kernels),
                        embed_dim=settings.memory.embed_dim)
    train = settings.train
    steps_per_epoch = train.steps_per_epoch or steps_per_pass(
        len(data.train_labels), train.batch_size, train.keep_partial_batch)
    total_steps = steps_per_epoch * train.epochs
    opt = settings.optim
    optimizer = make_optimizer(
        total_steps, max_lr=opt.max_lr, weight_decay=opt.weight_decay,
        reset_lr_every=steps_per_epoch if opt.reset_lr_each_epoch else 0,
        reset_lr=opt.learning_rate)
    size = settings.data.image_size
    memory = settings.memory
    if memory.kind == "queue":
        make_memory = functools.partial(QueueMemory.create, num_classes=data.num_classes,
                                        capacity=memory.queue_size, dim=memory.embed_dim)
    else:
        make_memory = functools.partial(BankMemory.create, train_labels=data.train_labels,
                                        num_classes=data.num_classes, dim=memory.embed_dim,
                                        rows=data.memory_rows,
                                        max_class_count=data.memory_class_rows)
    create_state = functools.partial(create_train_state, jax.random.key(settings.seed),
                                     networks, optimizer, make_memory, (size, size, 3))
    step_config = StepConfig.from_settings(settings, steps_per_epoch=steps_per_epoch,
                                           axis_name=AXIS)
    train_fn = make_train_step(networks, optimizer, step_config)
    precision = train.matmul_precision

    def train_with_lr(state, batch, class_weight):
        with matmul_precision(precision):
            new_state, out = train_fn(state, batch, class_weight)
        return new_state, {**out, "learning_rate": current_learning_rate(new_state.opt_state)}

    def eval_fn(state, batch, use_teacher):
        with matmul_precision(precision):
            return eval_step(state, batch, model=networks.network, use_teacher=use_teacher)

    compiled_eval = {
        teacher: parallel.compile(functools.partial(eval_fn, use_teacher=teacher),
                                  donate_state=False, sharded_outputs=True)
        for teacher in (False, True)}
    class_weight = np.asarray(losses.class_weights(data.class_counts), np.float32)
    # On a GPU the train step does not update the state in place: donated, its parameters
    # were copied before their update (283 of the H200 step's 3,545 kernels, at the same
    # bytes: docs/performance.md); the second copy of the state costs ~0.1 GB there.
    donate = platform != "gpu"
    return Run(settings, data, networks, optimizer, parallel, steps_per_epoch, total_steps,
               create_state,
               parallel.compile(train_with_lr, replicated_args=1, donate_state=donate),
               parallel.compile_side_by_side(train_with_lr, donate_state=donate),
               compiled_eval, class_weight)


def check_before_data(settings: Settings, num_devices: int | None = None) -> None:
    """The checks of a run that need no data, for before a data set is prepared: the batch
    splits over the devices (default: all) and into BatchNorm groups, and
    `model.pretrained` loads and fits the backbone (ConfigError or CheckpointError naming
    the key or the file)."""
    _check_device_layout(settings, num_devices or jax.device_count(), jax.process_count())
    if settings.model.pretrained not in ("", "none"):
        net, size = network(settings, num_classes=2), settings.data.image_size
        template = jax.eval_shape(lambda: net.init(
            jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
        import_densenet(load_state_dict(settings.model.pretrained), template,
                        name=f"model {settings.model.name}")


def _check_device_layout(settings: Settings, num_devices: int, num_processes: int) -> None:
    """ConfigError naming the key when the devices cannot form the fold groups or a batch
    cannot be split over the devices of one (all devices without fold groups)."""
    groups = settings.parallel.fold_axis_size
    if num_devices % groups or (groups > 1 and num_processes > 1):
        raise ConfigError(
            f"config key 'parallel.fold_axis_size' is {groups}: expected a divisor of the "
            f"{num_devices} devices of one process (several processes: --share_workdir, see "
            "docs/usage.md)")
    batch, group = settings.train.batch_size, settings.model.bn_group_size
    devices = num_devices // groups
    where = f"{devices} devices" + (f" of a fold group ({num_devices} / {groups})"
                                    if groups > 1 else "")
    if batch % devices:
        raise ConfigError(f"config key 'train.batch_size' is {batch}: expected a multiple of "
                          f"the {where}")
    per_device = batch // devices
    if group and per_device % group:
        raise ConfigError(
            f"config key 'model.bn_group_size' is {group}: expected a divisor of the "
            f"per-device batch ({batch} / {where} = {per_device}); BatchNorm "
            "groups cannot span devices")


def network(settings: Settings, num_classes: int, kernels: str = "auto") -> CRCKDNet:
    """The student's (and teacher's) network of `settings` for `num_classes` classes, its
    BatchNorm as the step runs it (groups, synchronised statistics, the double update)."""
    model = settings.model
    bn = BatchNormSettings(axis_name=AXIS if settings.parallel.sync_batch_norm else None,
                           group_size=model.bn_group_size)
    return CRCKDNet(densenet_config(model.name), num_classes, hidden_dim=model.hidden_dim,
                    dtype=settings.train.compute_dtype, bn=bn, kernels=kernels,
                    double_update_until_block=3 if model.reference_double_bn_update else 0)


def _with_pretrained(state: TrainState, model: CRCKDNet, path: str) -> TrainState:
    """Student and teacher backbones from a torchvision DenseNet checkpoint; each keeps its
    own freshly initialised head (the reference builds both networks from the checkpoint)."""
    state_dict = load_state_dict(path)
    load = lambda params, stats: import_densenet(  # noqa: E731
        state_dict, {"params": params, "batch_stats": stats}, name=f"model {model.config}")
    student = load(state.params["student"], state.batch_stats)
    # Copied: both imports may wrap the same checkpoint arrays, and the step may donate the
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
