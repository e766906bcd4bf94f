"""Typed run settings: one frozen dataclass per concern, each field one config key.

A field of `DataSettings` is the config key `data.<field>`, and so on for every section of
`Settings`; `seed` is top level. Each field declares its default, what it accepts (`Rule`)
and a one-line help; `SETTINGS` (the settings table), `default_config()` and the config
checks of `crckd_jax.config` are derived from these declarations. The command line turns
its validated config dict into a `Settings` once (`Settings.from_dict`); everything below it
receives the sections it uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from crckd_jax.models.presets import DENSENET_PRESETS
from crckd_jax.protocols import ABLATIONS

# The values of the choice settings that other modules branch on.
SOURCES = ("synthetic", "ham10000", "isic2018", "aptos", "csv")
MODELS = tuple(DENSENET_PRESETS)
LOSS_PRESETS = ("reference", "paper")
PARALLEL_BACKENDS = ("shard_map", "pmap")
MEMORY_KINDS = ("queue", "bank")
TEACHER_BN = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a setting accepts: its type, a check of the value and the words for both."""

    kind: type
    ok: Callable[[Any], bool]
    expected: str


def _int(lo: int, hi: int | None = None) -> Rule:
    if hi is None:
        return Rule(int, lambda v: v >= lo, f"an integer >= {lo}")
    return Rule(int, lambda v: lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def _float(lo: float, hi: float | None = None, *, open_lo: bool = False) -> Rule:
    low = (lambda v: v > lo) if open_lo else (lambda v: v >= lo)
    bracket = "(" if open_lo else "["
    if hi is None:
        return Rule(float, low, f'a number {">" if open_lo else ">="} {lo}')
    return Rule(float, lambda v: low(v) and v <= hi, f"a number in {bracket}{lo}, {hi}]")


def _choice(*options: str) -> Rule:
    return Rule(str, lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


_STR = Rule(str, lambda v: True, "a string")
_BOOL = Rule(bool, lambda v: True, "True or False")
_SEED = _int(0, 2**32 - 1)
_FOLD_LIST = Rule(str, lambda v: all(p.strip().isdigit() for p in v.split(",")) if v else True,
                  'comma-separated fold numbers such as "0,2", or ""')


def _s(default: Any, rule: Rule, help: str) -> Any:
    """A settings field: its default, its rule and its help (the field's metadata)."""
    return dataclasses.field(default=default, metadata={"rule": rule, "help": help})


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Where the images are, how they are split, stored and read (`data.*`)."""

    source: str = _s("ham10000", _choice(*SOURCES),
        "layout of data.dir (the data set as downloaded, or generated)")
    dir: str = _s("", _STR,
        "folder as downloaded; for 'synthetic' '' = generate into <workdir>/data")
    tfds_dir: str = _s("", _STR,
        "where prepared array_record data sets live; '' = <workdir>/data/tfds")
    image_size: int = _s(224, _int(16, 4096), "model input side in pixels (square)")
    store_size: int = _s(0, _int(0, 4096),
        "side of the stored images in pixels; 0 = data.image_size")
    num_folds: int = _s(5, _int(2), "k of the stratified (grouped) k-fold cross-validation")
    fold: int = _s(0, _int(0), "which fold is the test fold (0-based)")
    split_seed: int = _s(2020, _SEED,
        "seed of the fold assignment (2020 as the reference's APTOS split)")
    val_fraction: float = _s(0.0, _float(0.0, 0.5),
        "share of each training fold held out as validation; 0 = none")
    csv_file: str = _s("labels.csv", _STR,
        "'csv' source: the CSV, relative to data.dir or absolute")
    image_column: str = _s("image", _STR,
        "'csv' source: column with image paths (relative to the CSV)")
    label_column: str = _s("label", _STR,
        "'csv' source: column with class names or integer labels")
    group_column: str = _s("", _STR,
        "'csv' source: column with group ids (e.g. patient); '' = none")
    class_names: str = _s("", _STR,
        "'csv' source: comma-separated class order; '' = from the labels")
    skip_bad_images: bool = _s(False, _BOOL,
        "skip (and list) missing/undecodable images instead of failing")
    synthetic_num_images: int = _s(500, _int(20), "'synthetic' source: number of images generated")
    synthetic_image_size: int = _s(64, _int(16, 1024),
        "'synthetic' source: side of the generated JPEGs in pixels")
    synthetic_seed: int = _s(0, _SEED, "'synthetic' source: generator seed")
    read_threads: int = _s(4, _int(1),
        "grain read threads (beat worker processes on 2 cores, see docs)")
    worker_count: int = _s(0, _int(0), "grain worker processes; 0 = threads only")
    prefetch_batches: int = _s(4, _int(1), "batches prepared ahead per process, on the host")
    device_prefetch: int = _s(2, _int(1, 8),
        "batches put on the devices ahead of the step using them")
    augment: str = _s("device", _choice("device", "host"),
        "training views made in the compiled step (device) or by PIL (host)")
    build_threads: int = _s(4, _int(1), "threads decoding/resizing images while preparing")
    folds: str = _s("", _FOLD_LIST,
        '--mode cv: comma-separated test folds to run, e.g. "0,2"; "" = all')

    @property
    def stored_side(self) -> int:
        """Side in pixels of the stored images: `store_size`, or `image_size` when 0."""
        return self.store_size or self.image_size

    def folds_to_run(self) -> list[int]:
        """`folds` as a list of fold numbers ("" = every fold)."""
        if not self.folds:
            return list(range(self.num_folds))
        return [int(p) for p in self.folds.split(",") if p.strip()]


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The backbone and its BatchNorm (`model.*`)."""

    name: str = _s("densenet121", _choice(*MODELS),
        "backbone: a torchvision DenseNet, or a small one for tests and the demo")
    pretrained: str = _s("", _STR,
        "torchvision DenseNet weights (.safetensors, .pth, .npz) for student and teacher; "
        "'none' = random init (an explicit choice: real data sets need one or the other); "
        "'' = random init, for the synthetic source only")
    hidden_dim: int = _s(128, _int(1), "width of the head's feature layer (the CCD/CRP input)")
    bn_group_size: int = _s(0, _int(0),
        "BatchNorm statistics over groups of this many items of each device's batch, running "
        "statistics from the first group of the first device (the reference: DataParallel on "
        "2 GPUs, groups of 32); 0 = over each device's whole batch (or all devices, see "
        "parallel.sync_batch_norm)")
    reference_double_bn_update: bool = _s(False, _BOOL,
        "the reference's second pass through features[0:9]: BatchNorm running statistics of "
        "norm0 .. denseblock3 updated twice per step (student and train-mode teacher)")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The loop, the mean teacher, checkpoints and numerics (`train.*`)."""

    epochs: int = _s(80, _int(1), "training epochs per fold")
    batch_size: int = _s(32, _int(1), "global batch size (all processes and devices together)")
    steps_per_epoch: int = _s(0, _int(0), "steps per epoch; 0 = one pass over the training fold")
    keep_partial_batch: bool = _s(False, _BOOL,
        "the reference's loader: every pass ends with its partial batch (padded and masked) "
        "instead of leaving the remainder to other passes")
    checkpoint_every_steps: int = _s(500, _int(0),
        "checkpoint period in steps; 0 = at epoch ends only")
    ema_decay: float = _s(0.99, _float(0.0, 1.0), "mean-teacher EMA decay")
    teacher_bn: str = _s("train", _choice(*TEACHER_BN),
        "teacher BatchNorm: train (reference, own batch stats) | eval")
    teacher_rotate: bool = _s(True, _BOOL, "random 90-degree turn + flip of the teacher's view")
    eval_teacher: bool = _s(False, _BOOL, "also evaluate the mean teacher after every epoch")
    write_report: bool = _s(True, _BOOL,
        "write the figures of W/report/ when training ends (matplotlib, t-SNE)")
    log_every_steps: int = _s(10, _int(1), "period of train-metric records (JSONL, TensorBoard)")
    keep_checkpoints: int = _s(3, _int(1), "number of most recent checkpoints kept")
    dtype: str = _s("float32", _choice("float32", "bfloat16"),
        "compute dtype (parameters and memory stay float32)")
    matmul_precision: str = _s("default", _choice("default", "highest"),
        "float32 convolutions and matrix products: default (XLA's choice: TF32 on NVIDIA GPUs "
        "since Ampere, about 3 decimal digits) | highest (full float32, as on the CPU)")
    compilation_cache_dir: str = _s("", _STR,
        "persistent XLA cache; '' = $JAX_COMPILATION_CACHE_DIR, else ~/.cache/crckd_jax/xla")

    @property
    def compute_dtype(self):
        """`dtype` as a jax.numpy dtype."""
        import jax.numpy as jnp

        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    """How the devices share a step (`parallel.*`)."""

    backend: str = _s("shard_map", _choice(*PARALLEL_BACKENDS),
        "data-parallel compiler: shard_map (jit) | pmap")
    sync_batch_norm: bool = _s(False, _BOOL,
        "BatchNorm statistics over all devices (not per device)")
    folds_side_by_side: int = _s(1, _int(1),
        "--mode cv and table: this many folds of a rung trained as one program (states "
        "stacked on a fold axis, jax.vmap); 1 = one fold after another")
    fold_axis_size: int = _s(1, _int(1),
        "folds side by side on several devices: the devices form this many groups (the "
        "mesh's 'fold' axis), each training folds_side_by_side / this many of the folds, "
        "data-parallel over its own devices (shard_map, one process); 1 = every device takes "
        "a slice of every fold's batch")


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """The class memory and the contrastive (CCD/CRP) scoring (`memory.*`)."""

    kind: str = _s("queue", _choice(*MEMORY_KINDS),
        "class memory: queue (per class FIFO) | bank (one row per item)")
    num_positives: int = _s(20, _int(1), "P positives per anchor")
    num_negatives: int = _s(4096, _int(1), "K negatives per anchor")
    temperature: float = _s(0.07, _float(0.0, open_lo=True), "tau of the NCE softmax")
    momentum: float = _s(0.5, _float(0.0, 1.0), "momentum of the bank's row updates")
    queue_size: int = _s(256, _int(1), "rows per class of the queue memory")
    embed_dim: int = _s(128, _int(1), "width d of the CCD embeddings and memory rows")
    z_momentum: float = _s(0.0, _float(0.0, 1.0),
        "0 = freeze Z after the first batch (reference); else its EMA")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The weights of the four terms over training (`loss.*`, `crckd_jax.objective`)."""

    preset: str = _s("reference", _choice(*LOSS_PRESETS),
        "loss schedule: reference (authors' code) | paper")
    ccd_weight: float = _s(0.1, _float(0.0),
        "weight of the class-guided contrastive distillation term")
    crp_weight: float = _s(1.0, _float(0.0), "weight of the categorical relation preserving term")
    consistency: float = _s(1.0, _float(0.0),
        "weight of the mean-teacher consistency term (after ramp-up)")
    rampup_epochs: int = _s(30, _int(0),
        "sigmoid ramp-up length of the consistency weight in epochs")
    begin_epoch: int = _s(20, _int(0),
        "epoch from which the distillation terms are on (reference preset)")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """Adam under OneCycle (`optim.*`)."""

    learning_rate: float = _s(1e-4, _float(0.0, open_lo=True),
        "Adam base learning rate (the epoch-end reset's value)")
    max_lr: float = _s(3e-4, _float(0.0, open_lo=True), "OneCycle peak learning rate")
    weight_decay: float = _s(5e-4, _float(0.0), "coupled L2 weight decay")
    reset_lr_each_epoch: bool = _s(False, _BOOL,
        "the reference's epoch-end reset: the first step of every later epoch at learning_rate")


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    """`--mode predict` (`predict.*`)."""

    input: str = _s("", _STR, "--mode predict: a folder of images or a CSV with an image column")
    image_column: str = _s("image", _STR, "--mode predict with a CSV: column of image paths")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """`--mode eval` (`eval.*`)."""

    input: str = _s("", _STR,
        '--mode eval: a labelled folder (a subfolder per class) or CSV; "" = the run\'s test ' "split")
    image_column: str = _s("image", _STR, "--mode eval with a CSV: column of image paths")
    label_column: str = _s("label", _STR, "--mode eval with a CSV: column of class names")


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """`--mode export` (`export.*`)."""

    teacher: bool = _s(False, _BOOL, "--mode export: also write the mean teacher's weights")
    checkpoint: str = _s("latest", _choice("latest", "best_val"),
        '--mode export: from the newest checkpoint ("latest") or the best validation epoch\'s')



_RUNGS = Rule(str, lambda v: bool(v) and all(p.strip() in ABLATIONS for p in v.split(",")),
               "comma-separated ablations of " + ", ".join(ABLATIONS))
_SEED_LIST = Rule(str, lambda v: all(p.strip().isdigit() for p in v.split(",")) if v else True,
                  'comma-separated seeds such as "0,1", or ""')


@dataclasses.dataclass(frozen=True)
class TableSettings:
    """`--mode table`: the paper's table, rungs x folds x seeds (`table.*`)."""

    rungs: str = _s("baseline,mt,mt_ccd,crckd", _RUNGS,
        "--mode table: the rows, paper ablations (their loss weights replace loss.*)")
    seeds: str = _s("", _SEED_LIST,
        '--mode table: comma-separated seeds trained per rung and fold; "" = seed')

    def rung_list(self) -> list[str]:
        return [p.strip() for p in self.rungs.split(",")]

    def seed_list(self, default: int) -> list[int]:
        """`seeds` as a list ("" = [default], the run's seed)."""
        return [int(p) for p in self.seeds.split(",") if p.strip()] or [default]


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of a run, by section."""

    seed: int = _s(2020, _SEED, "seed of parameter init, shuffling and augmentation")
    data: DataSettings = _section(DataSettings)
    model: ModelSettings = _section(ModelSettings)
    train: TrainSettings = _section(TrainSettings)
    parallel: ParallelSettings = _section(ParallelSettings)
    memory: MemorySettings = _section(MemorySettings)
    loss: LossSettings = _section(LossSettings)
    optim: OptimSettings = _section(OptimSettings)
    predict: PredictSettings = _section(PredictSettings)
    eval: EvalSettings = _section(EvalSettings)
    export: ExportSettings = _section(ExportSettings)
    table: TableSettings = _section(TableSettings)

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        """The settings of a nested dict of every key (a validated config's `to_dict()`, a
        run's config.json); TypeError for a missing or unknown key."""
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)
                    if f.default_factory is not dataclasses.MISSING}
        return cls(**{k: sections[k](**v) if k in sections else v for k, v in values.items()})

    def to_dict(self) -> dict:
        """The nested dict of every key (what config.json and checkpoints hold)."""
        return dataclasses.asdict(self)

    def with_fold(self, fold: int) -> "Settings":
        """These settings with test fold `fold`."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, fold=fold))


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config key of the table: dotted name, default value, accepted values, help."""

    key: str
    default: Any
    rule: Rule
    help: str


def _table(cls: type, prefix: str = "") -> list[Setting]:
    rows = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            rows += _table(f.default_factory, f"{prefix}{f.name}.")
        else:
            rows.append(Setting(prefix + f.name, f.default, f.metadata["rule"],
                                f.metadata["help"]))
    return rows


SETTINGS: tuple[Setting, ...] = tuple(_table(Settings))  # the settings table, in order
KEYS = tuple(s.key for s in SETTINGS)  # every dotted key, in the table's order


def default_config() -> ml_collections.ConfigDict:
    """All keys of `SETTINGS` with their defaults (the reference protocol on HAM10000),
    unlocked: what the config files start from."""
    return ml_collections.ConfigDict(Settings().to_dict())
