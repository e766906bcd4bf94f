"""The configuration: every knob with its default, and the schema that checks a config.

`default_config()` holds every key with a one-line comment; `configs/*.py` override values and
lock the result. `validate(config)` names the dotted key and what was expected for an unknown
key, a missing key, a wrong type or an out-of-range value, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import ml_collections

from crckd_jax.models.torch_import import CHECKPOINT_SUFFIXES
from crckd_jax.errors import ConfigError  # noqa: F401  (config files raise config_lib.ConfigError)

SOURCES = ("synthetic", "ham10000", "isic2018", "aptos", "csv")
MODELS = ("densenet121", "densenet169", "densenet201", "densenet_small", "densenet_tiny")


def default_config() -> ml_collections.ConfigDict:
    """All keys with their defaults (the reference protocol on HAM10000), unlocked."""
    c = ml_collections.ConfigDict()
    c.seed = 2020  # seed of parameter init, shuffling and augmentation

    c.data = ml_collections.ConfigDict()
    c.data.source = "ham10000"  # layout of data.dir: synthetic | ham10000 | isic2018 | aptos | csv
    c.data.dir = ""  # folder as downloaded; for 'synthetic' '' = generate into <workdir>/data
    c.data.tfds_dir = ""  # where prepared array_record data sets live; '' = <workdir>/data/tfds
    c.data.image_size = 224  # model input side in pixels (square)
    c.data.store_size = 0  # side of the stored images in pixels; 0 = data.image_size
    c.data.num_folds = 5  # k of the stratified (grouped) k-fold cross-validation
    c.data.fold = 0  # which fold is the test fold (0-based)
    c.data.split_seed = 2020  # seed of the fold assignment (2020 as the reference's APTOS split)
    c.data.val_fraction = 0.0  # share of each training fold held out as validation; 0 = none
    c.data.csv_file = "labels.csv"  # 'csv' source: the CSV, relative to data.dir or absolute
    c.data.image_column = "image"  # 'csv' source: column with image paths (relative to the CSV)
    c.data.label_column = "label"  # 'csv' source: column with class names or integer labels
    c.data.group_column = ""  # 'csv' source: column with group ids (e.g. patient); '' = none
    c.data.class_names = ""  # 'csv' source: comma-separated class order; '' = from the labels
    c.data.skip_bad_images = False  # skip (and list) missing/undecodable images instead of failing
    c.data.synthetic_num_images = 500  # 'synthetic' source: number of images generated
    c.data.synthetic_image_size = 64  # 'synthetic' source: side of the generated JPEGs in pixels
    c.data.synthetic_seed = 0  # 'synthetic' source: generator seed
    c.data.read_threads = 4  # grain read threads (beat worker processes on 2 cores, see docs)
    c.data.worker_count = 0  # grain worker processes; 0 = threads only
    c.data.prefetch_batches = 4  # batches prepared ahead per process, on the host
    c.data.device_prefetch = 2  # batches put on the devices ahead of the step using them
    c.data.augment = "device"  # training views made in the compiled step (device) or by PIL (host)
    c.data.build_threads = 4  # threads decoding/resizing images while preparing
    c.data.folds = ""  # --mode cv: comma-separated test folds to run, e.g. "0,2"; "" = all

    c.model = ml_collections.ConfigDict()
    c.model.name = "densenet121"  # backbone: densenet121 | 169 | 201 | densenet_small | _tiny
    # torchvision DenseNet weights (.safetensors, .pth, .npz) for student and teacher;
    # 'none' = random init (an explicit choice: real data sets need one or the other);
    # '' = random init, for the synthetic source only
    c.model.pretrained = ""
    c.model.hidden_dim = 128  # width of the head's feature layer (the CCD/CRP input)
    # BatchNorm statistics over groups of this many items of each device's batch, running
    # statistics from the first group of the first device (the reference: DataParallel on
    # 2 GPUs, groups of 32); 0 = over each device's whole batch (or all devices, see
    # parallel.sync_batch_norm)
    c.model.bn_group_size = 0
    # the reference's second pass through features[0:9]: BatchNorm running statistics of
    # norm0 .. denseblock3 updated twice per step (student and train-mode teacher)
    c.model.reference_double_bn_update = False

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 80  # training epochs per fold
    c.train.batch_size = 32  # global batch size (all processes and devices together)
    c.train.steps_per_epoch = 0  # steps per epoch; 0 = one pass over the training fold
    # the reference's loader: every pass ends with its partial batch (padded and masked)
    # instead of leaving the remainder to other passes
    c.train.keep_partial_batch = False
    c.train.checkpoint_every_steps = 500  # checkpoint period in steps; 0 = at epoch ends only
    c.train.ema_decay = 0.99  # mean-teacher EMA decay
    c.train.teacher_bn = "train"  # teacher BatchNorm: train (reference, own batch stats) | eval
    c.train.teacher_rotate = True  # random 90-degree turn + flip of the teacher's view
    c.train.eval_teacher = False  # also evaluate the mean teacher after every epoch
    c.train.log_every_steps = 10  # period of train-metric records (JSONL, TensorBoard)
    c.train.keep_checkpoints = 3  # number of most recent checkpoints kept
    c.train.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, memory stay f32)
    # float32 convolutions and matrix products: default (XLA's choice: TF32 on NVIDIA GPUs
    # since Ampere, about 3 decimal digits) | highest (full float32, as on the CPU)
    c.train.matmul_precision = "default"
    c.train.compilation_cache_dir = ""  # persistent XLA cache; '' = ~/.cache/crckd_jax/xla

    c.parallel = ml_collections.ConfigDict()
    c.parallel.backend = "shard_map"  # data-parallel compiler: shard_map (jit) | pmap
    c.parallel.sync_batch_norm = False  # BatchNorm statistics over all devices (not per device)

    c.memory = ml_collections.ConfigDict()
    c.memory.kind = "queue"  # class memory: queue (per class FIFO) | bank (one row per item)
    c.memory.num_positives = 20  # P positives per anchor
    c.memory.num_negatives = 4096  # K negatives per anchor
    c.memory.temperature = 0.07  # tau of the NCE softmax
    c.memory.momentum = 0.5  # momentum of the bank's row updates
    c.memory.queue_size = 256  # rows per class of the queue memory
    c.memory.embed_dim = 128  # width d of the CCD embeddings and memory rows
    c.memory.z_momentum = 0.0  # 0 = freeze Z after the first batch (reference); else its EMA

    c.loss = ml_collections.ConfigDict()
    c.loss.preset = "reference"  # loss schedule: reference (authors' code) | paper
    c.loss.ccd_weight = 0.1  # weight of the class-guided contrastive distillation term
    c.loss.crp_weight = 1.0  # weight of the categorical relation preserving term
    c.loss.consistency = 1.0  # weight of the mean-teacher consistency term (after ramp-up)
    c.loss.rampup_epochs = 30  # sigmoid ramp-up length of the consistency weight in epochs
    c.loss.begin_epoch = 20  # epoch from which the distillation terms are on (reference preset)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4  # Adam base learning rate (the epoch-end reset's value)
    c.optim.max_lr = 3e-4  # OneCycle peak learning rate
    c.optim.weight_decay = 5e-4  # coupled L2 weight decay
    # the reference's epoch-end reset: the first step of every later epoch at learning_rate
    c.optim.reset_lr_each_epoch = False

    c.predict = ml_collections.ConfigDict()
    c.predict.input = ""  # --mode predict: a folder of images or a CSV with an image column
    c.predict.image_column = "image"  # --mode predict with a CSV: column of image paths

    c.eval = ml_collections.ConfigDict()
    # --mode eval: a labelled folder (a subfolder per class) or CSV; "" = the run's test split
    c.eval.input = ""
    c.eval.image_column = "image"  # --mode eval with a CSV: column of image paths
    c.eval.label_column = "label"  # --mode eval with a CSV: column of class names

    c.export = ml_collections.ConfigDict()
    c.export.teacher = False  # --mode export: also write the mean teacher's weights
    # --mode export: from the newest checkpoint ("latest") or the best validation epoch's
    c.export.checkpoint = "latest"
    return c


@dataclasses.dataclass(frozen=True)
class _Rule:
    kind: type
    ok: Callable[[Any], bool]
    expected: str


def _int(lo: int, hi: int | None = None) -> _Rule:
    if hi is None:
        return _Rule(int, lambda v: v >= lo, f"an integer >= {lo}")
    return _Rule(int, lambda v: lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def _float(lo: float, hi: float | None = None, *, open_lo: bool = False) -> _Rule:
    low = (lambda v: v > lo) if open_lo else (lambda v: v >= lo)
    bracket = "(" if open_lo else "["
    if hi is None:
        return _Rule(float, low, f'a number {">" if open_lo else ">="} {lo}')
    return _Rule(float, lambda v: low(v) and v <= hi, f"a number in {bracket}{lo}, {hi}]")


def _choice(*options: str) -> _Rule:
    return _Rule(str, lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


_ANY_STR = _Rule(str, lambda v: True, "a string")
_BOOL = _Rule(bool, lambda v: True, "True or False")

RULES: dict[str, _Rule] = {
    "seed": _int(0, 2**32 - 1),
    "data.source": _choice(*SOURCES),
    "data.dir": _ANY_STR,
    "data.tfds_dir": _ANY_STR,
    "data.image_size": _int(16, 4096),
    "data.store_size": _int(0, 4096),
    "data.num_folds": _int(2),
    "data.fold": _int(0),
    "data.split_seed": _int(0, 2**32 - 1),
    "data.val_fraction": _float(0.0, 0.5),
    "data.csv_file": _ANY_STR,
    "data.image_column": _ANY_STR,
    "data.label_column": _ANY_STR,
    "data.group_column": _ANY_STR,
    "data.class_names": _ANY_STR,
    "data.skip_bad_images": _BOOL,
    "data.synthetic_num_images": _int(20),
    "data.synthetic_image_size": _int(16, 1024),
    "data.synthetic_seed": _int(0, 2**32 - 1),
    "data.read_threads": _int(1),
    "data.worker_count": _int(0),
    "data.prefetch_batches": _int(1),
    "data.device_prefetch": _int(1, 8),
    "data.augment": _choice("device", "host"),
    "data.build_threads": _int(1),
    "data.folds": _Rule(str, lambda v: all(p.strip().isdigit() for p in v.split(",")) if v
                        else True, 'comma-separated fold numbers such as "0,2", or ""'),
    "model.name": _choice(*MODELS),
    "model.pretrained": _ANY_STR,
    "model.hidden_dim": _int(1),
    "model.bn_group_size": _int(0),
    "model.reference_double_bn_update": _BOOL,
    "train.epochs": _int(1),
    "train.batch_size": _int(1),
    "train.steps_per_epoch": _int(0),
    "train.keep_partial_batch": _BOOL,
    "train.checkpoint_every_steps": _int(0),
    "train.ema_decay": _float(0.0, 1.0),
    "train.teacher_bn": _choice("train", "eval"),
    "train.teacher_rotate": _BOOL,
    "train.eval_teacher": _BOOL,
    "train.log_every_steps": _int(1),
    "train.keep_checkpoints": _int(1),
    "train.dtype": _choice("float32", "bfloat16"),
    "train.matmul_precision": _choice("default", "highest"),
    "train.compilation_cache_dir": _ANY_STR,
    "parallel.backend": _choice("shard_map", "pmap"),
    "parallel.sync_batch_norm": _BOOL,
    "memory.kind": _choice("queue", "bank"),
    "memory.num_positives": _int(1),
    "memory.num_negatives": _int(1),
    "memory.temperature": _float(0.0, open_lo=True),
    "memory.momentum": _float(0.0, 1.0),
    "memory.queue_size": _int(1),
    "memory.embed_dim": _int(1),
    "memory.z_momentum": _float(0.0, 1.0),
    "loss.preset": _choice("reference", "paper"),
    "loss.ccd_weight": _float(0.0),
    "loss.crp_weight": _float(0.0),
    "loss.consistency": _float(0.0),
    "loss.rampup_epochs": _int(0),
    "loss.begin_epoch": _int(0),
    "optim.learning_rate": _float(0.0, open_lo=True),
    "optim.max_lr": _float(0.0, open_lo=True),
    "optim.weight_decay": _float(0.0),
    "optim.reset_lr_each_epoch": _BOOL,
    "predict.input": _ANY_STR,
    "predict.image_column": _ANY_STR,
    "eval.input": _ANY_STR,
    "eval.image_column": _ANY_STR,
    "eval.label_column": _ANY_STR,
    "export.teacher": _BOOL,
    "export.checkpoint": _choice("latest", "best_val"),
}


# Keys that may differ between a run and its resumption (`train` on a workdir with
# checkpoints): they change how the run is logged, checkpointed, read or evaluated, not what
# it computes. A change of any other key stops the resumption (see `config_changes`) unless
# the command line says `--allow_config_change`.
RESUME_FREE_KEYS = frozenset({
    "train.log_every_steps", "train.keep_checkpoints", "train.checkpoint_every_steps",
    "train.compilation_cache_dir", "train.eval_teacher",
    "data.read_threads", "data.prefetch_batches", "data.device_prefetch", "data.worker_count",
    "data.build_threads", "data.folds",
    "predict.input", "predict.image_column", "eval.input", "eval.image_column",
    "eval.label_column", "export.teacher", "export.checkpoint",
})

CONFIG_FILE = "config.json"  # the run's full validated config, in its workdir


def config_changes(old: dict, new: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of each computation-changing key that differs between the
    config a run was started with (`old`, as in its config.json) and `new`."""
    before, after = _flatten(old), _flatten(new)
    missing = object()
    return [(k, before.get(k, missing), after.get(k, missing))
            for k in sorted(set(before) | set(after))
            if k not in RESUME_FREE_KEYS and before.get(k, missing) != after.get(k, missing)]


def write_config_file(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `<workdir>/config.json` (atomically: a complete file or the previous one)."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_config_file(workdir: str) -> dict | None:
    """The config dict of `<workdir>/config.json`, None when there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the run's config {path}: {e}") from None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# torchvision's ImageNet checkpoints of the DenseNets (torchvision.models.densenet).
TORCHVISION_WEIGHTS = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad dotted key and what was expected."""
    flat = _flatten(config)
    for key in flat:
        if key not in RULES:
            raise ConfigError(f'unknown config key {key!r}; known keys: {", ".join(RULES)}')
    for key, rule in RULES.items():
        if key not in flat:
            raise ConfigError(f"missing config key {key!r}: expected {rule.expected}")
        value = flat[key]
        if not _type_ok(value, rule.kind) or not rule.ok(value):
            raise ConfigError(f"config key {key!r} is {value!r}: expected {rule.expected}")
    if flat["data.fold"] >= flat["data.num_folds"]:
        raise ConfigError(
            f"config key 'data.fold' is {flat['data.fold']}: expected an integer in "
            f"[0, {flat['data.num_folds'] - 1}] (data.num_folds={flat['data.num_folds']})"
        )
    if flat["memory.kind"] == "queue" and flat["memory.num_positives"] > flat["memory.queue_size"]:
        raise ConfigError(
            f"config key 'memory.num_positives' is {flat['memory.num_positives']}: expected at "
            f"most memory.queue_size={flat['memory.queue_size']} for the queue memory"
        )
    folds = [int(p) for p in flat["data.folds"].split(",") if p.strip()]
    if any(f >= flat["data.num_folds"] for f in folds):
        raise ConfigError(
            f"config key 'data.folds' is {flat['data.folds']!r}: expected fold numbers in "
            f"[0, {flat['data.num_folds'] - 1}] (data.num_folds={flat['data.num_folds']})"
        )
    pretrained = flat["model.pretrained"]
    if pretrained not in ("", "none") and (not os.path.isfile(pretrained)
                       or not pretrained.lower().endswith(CHECKPOINT_SUFFIXES)):
        raise ConfigError(
            f"config key 'model.pretrained' is {pretrained!r}: expected an existing "
            f"torchvision DenseNet checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), or "
            "'none' for random weights"
        )
    if flat["model.bn_group_size"] and flat["parallel.sync_batch_norm"]:
        raise ConfigError(
            f"config key 'model.bn_group_size' is {flat['model.bn_group_size']}: expected 0 "
            "with parallel.sync_batch_norm=True (groups are per device; synchronised "
            "statistics span all devices)"
        )
    if flat["data.source"] == "csv" and not flat["data.dir"]:
        raise ConfigError(
            "config key 'data.dir' is '': expected the folder of the CSV for " "data.source='csv'"
        )
    if flat["data.source"] in ("ham10000", "isic2018", "aptos") and not flat["data.dir"]:
        raise ConfigError(
            f"config key 'data.dir' is '': expected the downloaded folder for "
            f"data.source={flat['data.source']!r}"
        )


def require_initialisation(config: ml_collections.ConfigDict) -> None:
    """Training on a real data set needs `model.pretrained`: the reference's weights file,
    or 'none' for random weights (ConfigError naming torchvision's file otherwise)."""
    pretrained = config.model.pretrained
    if config.data.source != "synthetic" and not pretrained:
        name = config.model.name
        file = TORCHVISION_WEIGHTS.get(name, f"{name}-<hash>.pth")
        raise ConfigError(
            f"config key 'model.pretrained' is '': the reference starts {name} from "
            f"torchvision's ImageNet weights ({file}, "
            f"https://download.pytorch.org/models/{file}); expected the path of that file "
            f"(or its .safetensors/.npz conversion), or 'none' to train from random weights"
        )


# Loss weights (consistency, ccd_weight, crp_weight) of the paper's ablations.
ABLATIONS = {
    "baseline": (0.0, 0.0, 0.0),
    "mt": (1.0, 0.0, 0.0),
    "mt_ccd": (1.0, 0.1, 0.0),
    "crckd": (1.0, 0.1, 1.0),
}


# The authors' training run (train_CRCKD.py with its defaults on two GPUs): what a real-data
# config's `reference` argument sets.
REFERENCE_PROTOCOL = {
    ("train", "batch_size"): 64,  # --batch_size 32 per GPU x 2 GPUs
    ("train", "keep_partial_batch"): True,  # DataLoader(drop_last=False)
    ("model", "bn_group_size"): 32,  # DataParallel: BatchNorm statistics per GPU
    ("model", "reference_double_bn_update"): True,  # second pass of features[0:9]
    ("optim", "reset_lr_each_epoch"): True,  # lr back to 1e-4 at every epoch end
    ("memory", "kind"): "bank",  # one memory row per training item
}


def apply_dataset_arguments(config: ml_collections.ConfigDict, arg: str) -> None:
    """The argument of a real-data config: comma-separated, an ablation (a key of ABLATIONS;
    default crckd) and/or `reference` (REFERENCE_PROTOCOL: the authors' run)."""
    items = [a.strip() for a in arg.split(",") if a.strip()]
    ablations = [a for a in items if a != "reference"]
    if len(ablations) > 1:
        raise ConfigError(f"config argument {arg!r} names {len(ablations)} ablations: expected "
                          f"at most one of {', '.join(ABLATIONS)}, and/or 'reference'")
    apply_ablation(config, ablations[0] if ablations else "")
    if "reference" in items:
        for (section, key), value in REFERENCE_PROTOCOL.items():
            config[section][key] = value


def apply_ablation(config: ml_collections.ConfigDict, arg: str) -> None:
    """Sets the loss weights of ablation `arg` (a key of ABLATIONS; '' = crckd)."""
    arg = arg or "crckd"
    if arg not in ABLATIONS:
        raise ConfigError(
            f'unknown config argument {arg!r}: expected one of {", ".join(ABLATIONS)}, '
            "or 'reference'"
        )
    config.loss.consistency, config.loss.ccd_weight, config.loss.crp_weight = ABLATIONS[arg]


def store_size(config: ml_collections.ConfigDict) -> int:
    """Side in pixels of the stored images: data.store_size, or data.image_size when 0."""
    return config.data.store_size or config.data.image_size
