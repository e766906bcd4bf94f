"""The configuration: every setting declared once, and the schema that checks a config.

`SETTINGS` is the one table of settings (dotted key, default, accepted values, one-line
help). `default_config()`, `validate` and the README's settings reference
(`python -m crckd_jax.config --readme README.md`) are generated from it; `configs/*.py`
override values and lock the result. `validate(config)` names the dotted key and what was
expected for an unknown key, a missing key, a wrong type or an out-of-range value, before
anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable

import ml_collections

from crckd_jax.errors import ConfigError  # noqa: F401  (config files raise config_lib.ConfigError)
from crckd_jax.models.presets import DENSENET_PRESETS
from crckd_jax.models.torch_import import CHECKPOINT_SUFFIXES

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


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config key: dotted name, default value, accepted values, one-line help."""

    key: str
    default: Any
    rule: Rule
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("seed", 2020, _SEED, "seed of parameter init, shuffling and augmentation"),
    # data: where the images are, how they are split, stored and read
    Setting("data.source", "ham10000", _choice(*SOURCES),
        "layout of data.dir (the data set as downloaded, or generated)"),
    Setting("data.dir", "", _STR,
        "folder as downloaded; for 'synthetic' '' = generate into <workdir>/data"),
    Setting("data.tfds_dir", "", _STR,
        "where prepared array_record data sets live; '' = <workdir>/data/tfds"),
    Setting("data.image_size", 224, _int(16, 4096), "model input side in pixels (square)"),
    Setting("data.store_size", 0, _int(0, 4096),
        "side of the stored images in pixels; 0 = data.image_size"),
    Setting("data.num_folds", 5, _int(2), "k of the stratified (grouped) k-fold cross-validation"),
    Setting("data.fold", 0, _int(0), "which fold is the test fold (0-based)"),
    Setting("data.split_seed", 2020, _SEED,
        "seed of the fold assignment (2020 as the reference's APTOS split)"),
    Setting("data.val_fraction", 0.0, _float(0.0, 0.5),
        "share of each training fold held out as validation; 0 = none"),
    Setting("data.csv_file", "labels.csv", _STR,
        "'csv' source: the CSV, relative to data.dir or absolute"),
    Setting("data.image_column", "image", _STR,
        "'csv' source: column with image paths (relative to the CSV)"),
    Setting("data.label_column", "label", _STR,
        "'csv' source: column with class names or integer labels"),
    Setting("data.group_column", "", _STR,
        "'csv' source: column with group ids (e.g. patient); '' = none"),
    Setting("data.class_names", "", _STR,
        "'csv' source: comma-separated class order; '' = from the labels"),
    Setting("data.skip_bad_images", False, _BOOL,
        "skip (and list) missing/undecodable images instead of failing"),
    Setting("data.synthetic_num_images", 500, _int(20),
        "'synthetic' source: number of images generated"),
    Setting("data.synthetic_image_size", 64, _int(16, 1024),
        "'synthetic' source: side of the generated JPEGs in pixels"),
    Setting("data.synthetic_seed", 0, _SEED, "'synthetic' source: generator seed"),
    Setting("data.read_threads", 4, _int(1),
        "grain read threads (beat worker processes on 2 cores, see docs)"),
    Setting("data.worker_count", 0, _int(0), "grain worker processes; 0 = threads only"),
    Setting("data.prefetch_batches", 4, _int(1), "batches prepared ahead per process, on the host"),
    Setting("data.device_prefetch", 2, _int(1, 8),
        "batches put on the devices ahead of the step using them"),
    Setting("data.augment", "device", _choice("device", "host"),
        "training views made in the compiled step (device) or by PIL (host)"),
    Setting("data.build_threads", 4, _int(1), "threads decoding/resizing images while preparing"),
    Setting("data.folds", "", _FOLD_LIST,
        '--mode cv: comma-separated test folds to run, e.g. "0,2"; "" = all'),
    # model: the backbone and its BatchNorm
    Setting("model.name", "densenet121", _choice(*MODELS),
        "backbone: a torchvision DenseNet, or a small one for tests and the demo"),
    Setting("model.pretrained", "", _STR,
        "torchvision DenseNet weights (.safetensors, .pth, .npz) for student and teacher; "
        "'none' = random init (an explicit choice: real data sets need one or the other); "
        "'' = random init, for the synthetic source only"),
    Setting("model.hidden_dim", 128, _int(1),
        "width of the head's feature layer (the CCD/CRP input)"),
    Setting("model.bn_group_size", 0, _int(0),
        "BatchNorm statistics over groups of this many items of each device's batch, running "
        "statistics from the first group of the first device (the reference: DataParallel on "
        "2 GPUs, groups of 32); 0 = over each device's whole batch (or all devices, see "
        "parallel.sync_batch_norm)"),
    Setting("model.reference_double_bn_update", False, _BOOL,
        "the reference's second pass through features[0:9]: BatchNorm running statistics of "
        "norm0 .. denseblock3 updated twice per step (student and train-mode teacher)"),
    # train: the loop, the mean teacher, checkpoints and numerics
    Setting("train.epochs", 80, _int(1), "training epochs per fold"),
    Setting("train.batch_size", 32, _int(1),
        "global batch size (all processes and devices together)"),
    Setting("train.steps_per_epoch", 0, _int(0),
        "steps per epoch; 0 = one pass over the training fold"),
    Setting("train.keep_partial_batch", False, _BOOL,
        "the reference's loader: every pass ends with its partial batch (padded and masked) "
        "instead of leaving the remainder to other passes"),
    Setting("train.checkpoint_every_steps", 500, _int(0),
        "checkpoint period in steps; 0 = at epoch ends only"),
    Setting("train.ema_decay", 0.99, _float(0.0, 1.0), "mean-teacher EMA decay"),
    Setting("train.teacher_bn", "train", _choice(*TEACHER_BN),
        "teacher BatchNorm: train (reference, own batch stats) | eval"),
    Setting("train.teacher_rotate", True, _BOOL,
        "random 90-degree turn + flip of the teacher's view"),
    Setting("train.eval_teacher", False, _BOOL, "also evaluate the mean teacher after every epoch"),
    Setting("train.write_report", True, _BOOL,
            "write the figures of W/report/ when training ends (matplotlib, t-SNE)"),
    Setting("train.log_every_steps", 10, _int(1),
        "period of train-metric records (JSONL, TensorBoard)"),
    Setting("train.keep_checkpoints", 3, _int(1), "number of most recent checkpoints kept"),
    Setting("train.dtype", "float32", _choice("float32", "bfloat16"),
        "compute dtype (parameters and memory stay float32)"),
    Setting("train.matmul_precision", "default", _choice("default", "highest"),
        "float32 convolutions and matrix products: default (XLA's choice: TF32 on NVIDIA GPUs "
        "since Ampere, about 3 decimal digits) | highest (full float32, as on the CPU)"),
    Setting("train.compilation_cache_dir", "", _STR,
        "persistent XLA cache; '' = $JAX_COMPILATION_CACHE_DIR, else ~/.cache/crckd_jax/xla"),
    # parallel: how the devices share a step
    Setting("parallel.backend", "shard_map", _choice(*PARALLEL_BACKENDS),
        "data-parallel compiler: shard_map (jit) | pmap"),
    Setting("parallel.sync_batch_norm", False, _BOOL,
        "BatchNorm statistics over all devices (not per device)"),
    # memory: the class memory and the contrastive (CCD/CRP) scoring
    Setting("memory.kind", "queue", _choice(*MEMORY_KINDS),
        "class memory: queue (per class FIFO) | bank (one row per item)"),
    Setting("memory.num_positives", 20, _int(1), "P positives per anchor"),
    Setting("memory.num_negatives", 4096, _int(1), "K negatives per anchor"),
    Setting("memory.temperature", 0.07, _float(0.0, open_lo=True), "tau of the NCE softmax"),
    Setting("memory.momentum", 0.5, _float(0.0, 1.0), "momentum of the bank's row updates"),
    Setting("memory.queue_size", 256, _int(1), "rows per class of the queue memory"),
    Setting("memory.embed_dim", 128, _int(1), "width d of the CCD embeddings and memory rows"),
    Setting("memory.z_momentum", 0.0, _float(0.0, 1.0),
        "0 = freeze Z after the first batch (reference); else its EMA"),
    # loss: the weights of the four terms over training (crckd_jax/objective.py)
    Setting("loss.preset", "reference", _choice(*LOSS_PRESETS),
        "loss schedule: reference (authors' code) | paper"),
    Setting("loss.ccd_weight", 0.1, _float(0.0),
        "weight of the class-guided contrastive distillation term"),
    Setting("loss.crp_weight", 1.0, _float(0.0),
        "weight of the categorical relation preserving term"),
    Setting("loss.consistency", 1.0, _float(0.0),
        "weight of the mean-teacher consistency term (after ramp-up)"),
    Setting("loss.rampup_epochs", 30, _int(0),
        "sigmoid ramp-up length of the consistency weight in epochs"),
    Setting("loss.begin_epoch", 20, _int(0),
        "epoch from which the distillation terms are on (reference preset)"),
    # optim: Adam under OneCycle
    Setting("optim.learning_rate", 1e-4, _float(0.0, open_lo=True),
        "Adam base learning rate (the epoch-end reset's value)"),
    Setting("optim.max_lr", 3e-4, _float(0.0, open_lo=True), "OneCycle peak learning rate"),
    Setting("optim.weight_decay", 5e-4, _float(0.0), "coupled L2 weight decay"),
    Setting("optim.reset_lr_each_epoch", False, _BOOL,
        "the reference's epoch-end reset: the first step of every later epoch at learning_rate"),
    # predict, eval, export: the modes that read a trained run
    Setting("predict.input", "", _STR,
        "--mode predict: a folder of images or a CSV with an image column"),
    Setting("predict.image_column", "image", _STR,
        "--mode predict with a CSV: column of image paths"),
    Setting("eval.input", "", _STR,
        '--mode eval: a labelled folder (a subfolder per class) or CSV; "" = the run\'s test '
        "split"),
    Setting("eval.image_column", "image", _STR, "--mode eval with a CSV: column of image paths"),
    Setting("eval.label_column", "label", _STR, "--mode eval with a CSV: column of class names"),
    Setting("export.teacher", False, _BOOL, "--mode export: also write the mean teacher's weights"),
    Setting("export.checkpoint", "latest", _choice("latest", "best_val"),
        '--mode export: from the newest checkpoint ("latest") or the best validation epoch\'s'),
)

KEYS = tuple(s.key for s in SETTINGS)  # every dotted key, in the table's order
_BY_KEY = {s.key: s for s in SETTINGS}


def default_config() -> ml_collections.ConfigDict:
    """All keys of `SETTINGS` with their defaults (the reference protocol on HAM10000),
    unlocked."""
    config = ml_collections.ConfigDict()
    for setting in SETTINGS:
        *sections, leaf = setting.key.split(".")
        node = config
        for section in sections:
            if section not in node:
                node[section] = ml_collections.ConfigDict()
            node = node[section]
        node[leaf] = setting.default
    return config


# Keys that may differ between a run and its resumption (`train` on a workdir with
# checkpoints): they change how the run is logged, checkpointed, read or evaluated, not what
# it computes. A change of any other key stops the resumption (see `config_changes`) unless
# the command line says `--allow_config_change`.
RESUME_FREE_KEYS = frozenset({
    "train.log_every_steps", "train.keep_checkpoints", "train.checkpoint_every_steps",
    "train.compilation_cache_dir", "train.eval_teacher", "train.write_report",
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
    """Raises ConfigError naming the first bad dotted key and what was expected.

    The command line validates once per command (`crckd_jax.cli.execute`); the library's
    entry points (`train.train_and_evaluate`, `cv.run_cv`, `data.prepare.prepare`, ...) take
    a config that has passed this check.
    """
    flat = _flatten(config)
    for key in flat:
        if key not in _BY_KEY:
            raise ConfigError(f'unknown config key {key!r}; known keys: {", ".join(KEYS)}')
    for setting in SETTINGS:
        key, rule = setting.key, setting.rule
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


def reference_markdown() -> str:
    """The settings table as markdown (key | default | expected | help), one row per key."""
    cell = lambda text: text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    rows = ["| key | default | expected | help |", "|---|---|---|---|"]
    rows += [f"| `{s.key}` | `{s.default!r}` | {cell(s.rule.expected)} | {cell(s.help)} |"
             for s in SETTINGS]
    return "\n".join(rows) + "\n"


README_BEGIN, README_END = "<!-- settings:begin -->", "<!-- settings:end -->"


def with_reference(readme: str) -> str:
    """`readme` (a README's text) with `reference_markdown()` between its settings markers."""
    start = readme.index(README_BEGIN) + len(README_BEGIN)
    return f"{readme[:start]}\n{reference_markdown()}{readme[readme.index(README_END):]}"


def main(argv: list[str] | None = None) -> None:
    """`python -m crckd_jax.config` prints the settings table as markdown; with
    `--readme PATH` it writes the table between the settings markers of PATH instead."""
    parser = argparse.ArgumentParser(prog="python -m crckd_jax.config",
                                     description="The settings table as markdown.")
    parser.add_argument("--readme", metavar="PATH",
                        help="write the table between the settings markers of this file")
    args = parser.parse_args(argv)
    if not args.readme:
        sys.stdout.write(reference_markdown())
        return
    with open(args.readme) as f:
        text = f.read()
    with open(args.readme, "w") as f:
        f.write(with_reference(text))


if __name__ == "__main__":
    main()
