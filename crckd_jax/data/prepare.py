"""`--mode prepare`: a data folder -> array_record data set, fold CSVs, data_summary.json.

Workdir layout written here and read by `load`:
  W/data_summary.json          num_images, class_names, class_counts, num_groups, folds
  W/data/dataset.json          where the prepared TFDS data set is, and its class names
  W/data/folds/fold_<k>.csv    record, item_id, group_id, label, split (train | val | test)
  W/data/skipped.csv           items skipped on request (data.skip_bad_images), with reasons
  W/data/synthetic/            the generated images ('synthetic' source without data.dir)
  W/data/tfds/                 the TFDS data sets (unless data.tfds_dir is set)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from crckd_jax.data import builders, sources, splits, synthetic
from crckd_jax.errors import DataError
from crckd_jax.settings import Settings


def _paths(workdir: str) -> dict[str, str]:
    data = os.path.join(workdir, "data")
    return dict(
        data=data,
        dataset=os.path.join(data, "dataset.json"),
        folds=os.path.join(data, "folds"),
        skipped=os.path.join(data, "skipped.csv"),
        synthetic=os.path.join(data, "synthetic"),
        tfds=os.path.join(data, "tfds"),
        summary=os.path.join(workdir, "data_summary.json"),
    )


def _source_folder(data, paths: dict[str, str]) -> tuple[str, str]:
    """(layout, folder) of the `data` settings' source; generates the synthetic set if
    needed."""
    if data.source == "synthetic":
        root = data.dir or paths["synthetic"]
        synthetic.generate(
            root, data.synthetic_num_images, data.synthetic_image_size, data.synthetic_seed
        )
        return "ham10000", root
    if not os.path.isdir(data.dir):
        raise DataError(f"data.dir {data.dir!r} is not a folder")
    return data.source, data.dir


def _source(data, paths: dict[str, str]):
    """(folder, store size, builder config, listing) of the `data` settings' source as it is
    now (the listing checked, DataError naming any problem)."""
    layout, root = _source_folder(data, paths)
    store = data.stored_side
    csv_options = dict(
        csv_file=data.csv_file,
        image_column=data.image_column,
        label_column=data.label_column,
        group_column=data.group_column,
        class_names=data.class_names,
    )
    config, listing = builders.source_config(
        layout, root, store, csv_options, data.skip_bad_images, data.build_threads)
    return root, store, config, listing


def stale_reason(settings: Settings, workdir: str) -> str | None:
    """None when `workdir`'s prepared data set was made from the source as it is now (the
    same files, sizes, modification times and labels); else why it must be prepared."""
    paths = _paths(workdir)
    if not os.path.isfile(paths["dataset"]):
        return f"{workdir} holds no prepared data set yet"
    with open(paths["dataset"]) as f:
        prepared = json.load(f).get("source_name")
    _, _, config, _ = _source(settings.data, paths)
    if prepared != config.name:
        return (f"the source changed since {paths['dataset']} was prepared (files added, "
                "removed or replaced, labels or options edited)")
    return None


def _metadata(dataset_dir: str) -> tuple[list[str], list[str], np.ndarray]:
    """(item ids, group ids, labels [N] int32) of every record, images left undecoded."""
    source = tfds.builder_from_directory(dataset_dir).as_data_source(
        split="train", decoders={"image": tfds.decode.SkipDecoding()}
    )
    rows = source.__getitems__(list(range(len(source)))) if len(source) else []
    return (
        [r["item_id"].decode() for r in rows],
        [r["group_id"].decode() for r in rows],
        np.array([r["label"] for r in rows], np.int32),
    )


def _skipped(listing: sources.Listing, kept: set[str], store: int) -> list[tuple[str, str]]:
    """Items of the listing absent from the data set, with the reason each was skipped."""
    out = list(listing.skipped)
    for item in listing.items:
        if item.item_id not in kept:
            try:
                sources.load_rgb(item.path, store)
                reason = "not stored"
            except DataError as e:
                reason = str(e)
            out.append((item.item_id, reason))
    return out


def prepare(
    settings: Settings, workdir: str, log: Callable[[str], None] = print
) -> dict:
    """Builds the data set if needed, writes the folds and data_summary.json, logs a summary
    table, and returns the summary dict. Raises DataError/ConfigError naming what is
    wrong."""
    paths = _paths(workdir)
    os.makedirs(paths["data"], exist_ok=True)
    data = settings.data
    root, store, builder_config, listing = _source(data, paths)
    dataset_dir = builders.build(builder_config, root, data.tfds_dir or paths["tfds"], log)
    item_ids, group_ids, labels = _metadata(dataset_dir)
    class_names = listing.class_names

    skipped = _skipped(listing, set(item_ids), store)
    if skipped:
        with open(paths["skipped"], "w", newline="") as f:
            csv.writer(f).writerows([("item", "reason")] + skipped)
        log(
            f"Skipped {len(skipped)} item(s) (data.skip_bad_images=True), listed in "
            f'{paths["skipped"]}:'
        )
        for item, reason in skipped[:20]:
            log(f"  {item}: {reason}")
    elif os.path.exists(paths["skipped"]):
        os.remove(paths["skipped"])

    groups = np.array(group_ids)
    splits.check_classes(labels, groups, class_names, data.num_folds)
    parts = splits.assign_folds(labels, groups, data.num_folds, data.split_seed, data.val_fraction)
    splits.write_folds(paths["folds"], parts, item_ids, group_ids, labels)
    folds = [splits.read_fold(paths["folds"], k) for k in range(data.num_folds)]
    if settings.memory.kind == "bank":
        for fold in folds:
            splits.check_positives(fold, class_names, settings.memory.num_positives)

    with open(paths["dataset"], "w") as f:
        json.dump(
            {
                "dataset_dir": os.path.abspath(dataset_dir),
                "source_name": builder_config.name,
                "class_names": class_names,
                "source": data.source,
                "folder": os.path.abspath(root),
            },
            f,
            indent=1,
        )
    summary = {
        "num_images": len(labels),
        "class_names": list(class_names),
        "class_counts": np.bincount(labels, minlength=len(class_names)).tolist(),
        "num_groups": len(set(group_ids)),
        "folds": [{"train": len(f.train), "test": len(f.test)} for f in folds],
    }
    with open(paths["summary"], "w") as f:
        json.dump(summary, f, indent=1)
    _log_table(log, summary, folds, data.source, root, dataset_dir)
    return summary


def _log_table(
    log: Callable[[str], None],
    summary: dict,
    folds: list[splits.Fold],
    source: str,
    root: str,
    dataset_dir: str,
) -> None:
    log(f'{source}: {summary["num_images"]} images in {summary["num_groups"]} groups from {root}')
    log(f"stored in {dataset_dir}")
    width = max(len(n) for n in summary["class_names"]) + 2
    log(f'{"class":<{width}}{"images":>8}{"share":>8}')
    for name, count in zip(summary["class_names"], summary["class_counts"]):
        log(f'{name:<{width}}{count:>8}{count / summary["num_images"]:>8.1%}')
    log(f'{"fold":<6}{"train":>7}{"val":>6}{"test":>6}')
    for f in folds:
        log(f"{f.fold:<6}{len(f.train):>7}{len(f.val):>6}{len(f.test):>6}")


@dataclasses.dataclass(frozen=True)
class FoldData:
    """A prepared data set (random access by record number) and one fold of it."""

    source: Sequence[dict]  # tfds ArrayRecordDataSource: image uint8 [S, S, 3], label, ids
    fold: splits.Fold
    class_names: tuple[str, ...]
    # (training items, items of the largest class) of the largest training part over the
    # data set's folds: the shapes every fold's bank memory takes (0: this fold's own).
    largest_fold: tuple[int, int] = (0, 0)

    @property
    def train_labels(self) -> np.ndarray:
        """[N_train] int32, aligned with the training batches' `index`."""
        return self.fold.train_labels

    @property
    def class_counts(self) -> np.ndarray:
        """[C] int64 images per class in the training part of the fold."""
        return np.bincount(self.fold.train_labels, minlength=len(self.class_names))


def load(workdir: str, fold: int) -> FoldData:
    """The prepared data set and fold `fold` of `workdir` (DataError if not prepared)."""
    paths = _paths(workdir)
    if not os.path.isfile(paths["dataset"]):
        raise DataError(f"{workdir!r} holds no prepared data set; run --mode prepare first "
                        f"(--mode eval --config.eval.input=DIR_OR_CSV evaluates other "
                        f"labelled images without it)")
    with open(paths["dataset"]) as f:
        info = json.load(f)
    source = tfds.builder_from_directory(info["dataset_dir"]).as_data_source(split="train")
    num_classes = len(info["class_names"])
    folds = [splits.read_fold(paths["folds"], k) for k in _fold_numbers(paths["folds"], fold)]
    return FoldData(
        source=source,
        fold=next(f for f in folds if f.fold == fold),
        class_names=tuple(info["class_names"]),
        largest_fold=(max(len(f.train_labels) for f in folds),
                      max(int(np.bincount(f.train_labels, minlength=num_classes).max(initial=0))
                          for f in folds)),
    )


def _fold_numbers(directory: str, fold: int) -> list[int]:
    """The folds written in `directory` (`fold_<k>.csv`), and `fold` (whose file, if it is
    missing, `splits.read_fold` names)."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    found = {int(n[5:-4]) for n in names
             if n.startswith("fold_") and n.endswith(".csv") and n[5:-4].isdigit()}
    return sorted(found | {fold})
