"""Stratified k-fold splits, grouped where groups exist, saved to and read from CSV.

Without groups (every item its own group) fold membership equals scikit-learn's
`StratifiedKFold(k, shuffle=True, random_state=seed)` on the labels in record order (the
reference's APTOS protocol). With groups it is `StratifiedGroupKFold` with the same
arguments: no group is on both sides. An optional inner validation part of each training
fold is split the same way from the training items.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np
from sklearn import model_selection

from crckd_jax.errors import DataError

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold: record numbers (ascending) and labels of each part. Position i of `train`
    is the training `index` i used by the pipeline and the bank memory."""

    fold: int
    train: np.ndarray  # [N_train] int64 record numbers
    train_labels: np.ndarray  # [N_train] int32
    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


def _kfold(labels: np.ndarray, groups: np.ndarray, k: int, seed: int):
    x = np.zeros((len(labels), 1))
    if len(np.unique(groups)) == len(groups):
        return model_selection.StratifiedKFold(k, shuffle=True, random_state=seed).split(x, labels)
    return model_selection.StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(
        x, labels, groups
    )


def check_classes(
    labels: np.ndarray, groups: np.ndarray, class_names: Sequence[str], num_folds: int
) -> None:
    """DataError if a class is empty or has fewer groups than folds (so some test fold would
    lack it)."""
    for c, name in enumerate(class_names):
        in_class = labels == c
        if not in_class.any():
            raise DataError(f"class {name!r} (label {c}) has no images; every class needs images")
        num_groups = len(np.unique(groups[in_class]))
        if num_groups < num_folds:
            raise DataError(
                f"class {name!r} has {in_class.sum()} image(s) in {num_groups} group(s), too few for "
                f"data.num_folds={num_folds}: each class needs at least as many groups as folds"
            )


def assign_folds(
    labels: np.ndarray, groups: np.ndarray, num_folds: int, seed: int, val_fraction: float = 0.0
) -> np.ndarray:
    """[num_folds, N] array of 'train' | 'val' | 'test' for every fold and record."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    parts = np.full((num_folds, len(labels)), "train", dtype="<U5")
    for k, (train, test) in enumerate(_kfold(labels, groups, num_folds, seed)):
        parts[k, test] = "test"
        if val_fraction > 0:
            inner = max(2, int(round(1.0 / val_fraction)))
            _, val = next(_kfold(labels[train], groups[train], inner, seed))
            parts[k, train[val]] = "val"
    return parts


def check_positives(fold: Fold, class_names: Sequence[str], num_positives: int) -> None:
    """DataError if a class has fewer training items than the P positives the bank memory
    draws per anchor (without replacement, as the reference)."""
    counts = np.bincount(fold.train_labels, minlength=len(class_names))
    for c, name in enumerate(class_names):
        if counts[c] < num_positives:
            raise DataError(
                f"class {name!r} has {counts[c]} training image(s) in fold {fold.fold}, fewer than "
                f"memory.num_positives={num_positives} positives of the bank memory; lower "
                "memory.num_positives or data.num_folds"
            )


def write_folds(
    directory: str,
    parts: np.ndarray,
    item_ids: Sequence[str],
    group_ids: Sequence[str],
    labels: np.ndarray,
) -> list[str]:
    """Writes `fold_<k>.csv` (record, item_id, group_id, label, split) per fold; returns paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, fold_parts in enumerate(parts):
        path = os.path.join(directory, f"fold_{k}.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["record", "item_id", "group_id", "label", "split"])
            for r, part in enumerate(fold_parts):
                writer.writerow([r, item_ids[r], group_ids[r], int(labels[r]), part])
        paths.append(path)
    return paths


def read_fold(directory: str, fold: int) -> Fold:
    """The fold written by `write_folds`; DataError if the file is missing or malformed."""
    path = os.path.join(directory, f"fold_{fold}.csv")
    if not os.path.isfile(path):
        raise DataError(f"fold file {path!r} does not exist; run --mode prepare first")
    records: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
    with open(path, newline="") as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):
            if row.get("split") not in records:
                raise DataError(
                    f'{path!r} row {row_number}: split {row.get("split")!r} is not one of '
                    f"{SPLITS}"
                )
            records[row["split"]].append((int(row["record"]), int(row["label"])))
    arrays = {}
    for split, pairs in records.items():
        pairs.sort()
        arrays[split] = np.array([p[0] for p in pairs], np.int64)
        arrays[f"{split}_labels"] = np.array([p[1] for p in pairs], np.int32)
    return Fold(fold=fold, **arrays)
