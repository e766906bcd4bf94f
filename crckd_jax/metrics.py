"""Classification metrics of the reference evaluation (scikit-learn based).

All functions take class probabilities ``probs`` [N, C] (any float dtype, e.g. the
softmax of the logits) and integer ``labels`` [N] in ``[0, C)``. The predicted class
is ``argmax(probs, axis=1)`` (first index on ties).

Key mapping to the reference ``compute_isic_metrics``: its ``AUC_ovo`` is called
with one-hot targets, which scikit-learn treats as multilabel, i.e. one-vs-rest;
that is ``auc_ovr`` here. Its ``AUC_macro`` is the Hand & Till one-vs-one AUC, i.e.
``auc_ovo`` here.

Classes absent from ``labels`` (possible on a small test fold) give one
:class:`sklearn.exceptions.UndefinedMetricWarning` per call and:

* ``auc_ovr``: the mean over the classes whose one-vs-rest AUC is defined (those
  with at least one positive and one negative sample); NaN if there is none;
* ``auc_ovo``: Hand & Till over the pairs of classes present in ``labels`` (what
  scikit-learn computes with ``labels=range(C)``); NaN if fewer than two are present;
* ``bacc``: mean recall over the classes present in ``labels`` (scikit-learn);
* ``prec``/``rec``/``f1``/``spec``: macro means over the classes present in
  ``labels`` or predicted (scikit-learn's default label set, as in the reference);
  0 where undefined (e.g. precision of a never-predicted class);
* ``kappa``: quadratic weights use the class ids 0..C-1 as ordinal positions, so
  an absent class keeps the distance between its neighbours (the reference's
  default label set would close that gap; both agree when no class is absent from
  both labels and predictions).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

__all__ = ["classification_metrics", "per_class_report", "confusion"]


def _check_inputs(probs, labels, num_classes):
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be [N] = [{probs.shape[0]}], got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    c = probs.shape[1] if num_classes is None else int(num_classes)
    if probs.shape[1] != c:
        raise ValueError(f"probs has {probs.shape[1]} columns, num_classes is {c}")
    if labels.size and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be in [0, {c}), got [{labels.min()}, {labels.max()}]")
    return probs, labels.astype(np.int64), c


def _predict(probs: np.ndarray) -> np.ndarray:
    return np.argmax(probs, axis=1)


def _specificity_macro(labels: np.ndarray, pred: np.ndarray) -> float:
    """Macro TN / (TN + FP) over the classes in ``labels`` or ``pred`` (0 if undefined).

    Same definition as ``imblearn.metrics.specificity_score(average='macro')``.
    """
    mcm = multilabel_confusion_matrix(labels, pred)  # [K, 2, 2]: [[TN, FP], [FN, TP]]
    tn, fp = mcm[:, 0, 0].astype(np.float64), mcm[:, 0, 1].astype(np.float64)
    denom = tn + fp
    spec = np.divide(tn, denom, out=np.zeros_like(tn), where=denom > 0)
    return float(np.mean(spec))


def _auc_ovr(labels: np.ndarray, probs: np.ndarray, c: int) -> float:
    """Macro one-vs-rest AUC over the classes where it is defined."""
    one_hot = np.eye(c, dtype=np.int64)[labels]
    positives = one_hot.sum(axis=0)
    defined = (positives > 0) & (positives < labels.size)
    if not defined.any():
        return float("nan")
    if defined.all():
        # Exactly the reference call (one-hot targets -> multilabel -> OvR).
        return float(roc_auc_score(one_hot, probs, average="macro"))
    per_class = roc_auc_score(one_hot[:, defined], probs[:, defined], average=None)
    return float(np.mean(per_class))


def _auc_ovo(labels: np.ndarray, probs: np.ndarray, c: int) -> float:
    """Hand & Till one-vs-one AUC over the pairs of classes present in ``labels``."""
    if np.unique(labels).size < 2:
        return float("nan")
    scores = probs.astype(np.float64)
    row_sums = scores.sum(axis=1, keepdims=True)
    # scikit-learn refuses rows that do not sum to 1 (np.allclose with its default
    # tolerances). Renormalise only then, so that valid inputs are scored unchanged,
    # exactly as the reference scores them.
    if not np.allclose(1, row_sums):
        scores = scores / row_sums
    return float(
        roc_auc_score(labels, scores, multi_class="ovo", average="macro", labels=np.arange(c))
    )


#: The test metrics `classification_metrics` returns, in reporting order.
METRIC_KEYS = ("acc", "bacc", "prec", "rec", "f1", "auc_ovr", "auc_ovo", "spec", "kappa")


def classification_metrics(probs, labels, num_classes: int | None = None) -> dict[str, float]:
    """Reference test metrics from ``probs`` [N, C] and ``labels`` [N] (int).

    Returns floats keyed ``acc, bacc, prec, rec, f1, auc_ovr, auc_ovo, spec, kappa``
    (precision/recall/F1/specificity macro-averaged, kappa quadratic-weighted).
    """
    probs, labels, c = _check_inputs(probs, labels, num_classes)
    pred = _predict(probs)
    absent = np.setdiff1d(np.arange(c), labels)
    with warnings.catch_warnings():
        # Absent classes make scikit-learn warn once per metric and class; one
        # summary warning is issued below instead.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out = {
            "acc": float(accuracy_score(labels, pred)),
            "bacc": float(balanced_accuracy_score(labels, pred)),
            "prec": float(precision_score(labels, pred, average="macro", zero_division=0)),
            "rec": float(recall_score(labels, pred, average="macro", zero_division=0)),
            "f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
            "auc_ovr": _auc_ovr(labels, probs, c),
            "auc_ovo": _auc_ovo(labels, probs, c),
            "spec": _specificity_macro(labels, pred),
            "kappa": float(
                cohen_kappa_score(labels, pred, labels=np.arange(c), weights="quadratic")
            ),
        }
    if absent.size:
        warnings.warn(
            f"classes {absent.tolist()} do not occur in labels: auc_ovr averages the "
            "other classes, auc_ovo uses the pairs of present classes, and bacc only "
            "the present classes",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    return out


def format_metrics(values: Mapping[str, float]) -> str:
    """`acc=0.8123 bacc=...`: the `METRIC_KEYS` of `values` (e.g. a `classification_metrics`
    result), in that order, with 4 decimals: the one-line form the commands log."""
    return " ".join(f"{k}={values[k]:.4f}" for k in METRIC_KEYS)


def confusion(probs, labels, num_classes: int | None = None) -> np.ndarray:
    """Confusion matrix [C, C] (rows: true class, columns: predicted class)."""
    probs, labels, c = _check_inputs(probs, labels, num_classes)
    return confusion_matrix(labels, _predict(probs), labels=np.arange(c))


def per_class_report(
    probs, labels, class_names: Sequence[str], *, output_dict: bool = False, digits: int = 4
) -> str | dict:
    """scikit-learn ``classification_report`` (per-class precision/recall/F1/support).

    ``class_names`` [C] names the columns of ``probs`` [N, C]; classes never
    predicted or absent get 0 instead of a warning.
    """
    probs, labels, c = _check_inputs(probs, labels, len(class_names))
    return classification_report(
        labels,
        _predict(probs),
        labels=np.arange(c),
        target_names=list(class_names),
        digits=digits,
        output_dict=output_dict,
        zero_division=0,
    )
