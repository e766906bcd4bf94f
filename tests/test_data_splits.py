"""Fold assignment: scikit-learn equivalence, no group on both sides, CSV round trip, checks."""

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from crckd_jax.data import splits
from crckd_jax.errors import DataError


def test_ungrouped_folds_equal_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=300, p=[0.5, 0.1, 0.2, 0.1, 0.1])
    groups = np.array([f"id{i}" for i in range(300)])
    parts = splits.assign_folds(labels, groups, 5, 2020)
    expected = StratifiedKFold(n_splits=5, shuffle=True, random_state=2020)
    for k, (train, test) in enumerate(expected.split(np.zeros(300), labels)):
        np.testing.assert_array_equal(np.flatnonzero(parts[k] == "test"), test)
        np.testing.assert_array_equal(np.flatnonzero(parts[k] == "train"), train)


def test_grouped_folds_never_share_a_group():
    rng = np.random.default_rng(1)
    groups = np.array([f"L{g}" for g in rng.integers(0, 120, size=300)])
    group_label = {g: rng.integers(0, 4) for g in set(groups)}
    labels = np.array([group_label[g] for g in groups])
    parts = splits.assign_folds(labels, groups, 5, 7, val_fraction=0.2)
    assert ((parts == "test").sum(axis=0) == 1).all()  # every item tested exactly once
    for fold in parts:
        sides = [set(groups[fold == s]) for s in splits.SPLITS]
        assert (
            not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        )
        assert 0.1 < (fold == "val").mean() < 0.3
    np.testing.assert_array_equal(
        parts, splits.assign_folds(labels, groups, 5, 7, val_fraction=0.2)
    )


def test_csv_round_trip(tmp_path):
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    groups = [f"g{i}" for i in range(10)]
    parts = splits.assign_folds(labels, np.array(groups), 2, 0)
    splits.write_folds(str(tmp_path), parts, [f"i{i}" for i in range(10)], groups, labels)
    fold = splits.read_fold(str(tmp_path), 1)
    np.testing.assert_array_equal(fold.train, np.flatnonzero(parts[1] == "train"))
    np.testing.assert_array_equal(fold.train_labels, labels[fold.train])
    assert len(fold.val) == 0 and len(fold.test) == 5
    with pytest.raises(DataError, match="fold_7.csv.*run --mode prepare"):
        splits.read_fold(str(tmp_path), 7)


def test_class_checks_name_the_class():
    labels = np.array([0, 0, 0, 2, 2, 2])
    groups = np.array(["a", "b", "c", "d", "e", "f"])
    with pytest.raises(DataError, match=r"class 'b' \(label 1\) has no images"):
        splits.check_classes(labels, groups, ["a", "b", "c"], 2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = np.array(["a", "b", "c", "d", "d", "e"])
    with pytest.raises(
        DataError, match=r"class 'y' has 3 image\(s\) in 2 group\(s\).*num_folds=3"
    ):
        splits.check_classes(labels, groups, ["x", "y"], 3)
    fold = splits.Fold(0, np.arange(4), np.array([0, 0, 0, 1]), *[np.zeros(0, int)] * 4)
    with pytest.raises(
        DataError, match=r"class 'y' has 1 training image\(s\) in fold 0.*num_positives=2"
    ):
        splits.check_positives(fold, ["x", "y"], 2)
    splits.check_positives(fold, ["x", "y"], 1)
