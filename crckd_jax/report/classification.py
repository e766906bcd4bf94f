"""Classification figures from test-fold predictions: confusion matrices and ROC curves.

Inputs: ``probs`` [N, C] (class probabilities, float), ``labels`` [N] (int in [0, C))
and C class names. Output: one PNG per function.
"""

from __future__ import annotations

import pathlib
import textwrap

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, auc, roc_curve

from crckd_jax.report._figure import (check_eval, class_colors, new_figure, save, styled,
                                      suptitle)

__all__ = ["plot_confusion", "plot_roc"]


def _style_tick_labels(ax) -> None:
    for label in ax.get_xticklabels():
        label.set_rotation(40)
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")


@styled
def plot_confusion(probs, labels, class_names, path, *, title: str = "") -> pathlib.Path:
    """Confusion matrices of ``argmax(probs)`` vs ``labels``: counts and row-normalised.

    The row-normalised panel shows the recall of each true class (an absent class
    has an all-zero row).
    """
    probs, labels, names = check_eval(probs, labels, class_names)
    c = len(names)
    pred = np.argmax(probs, axis=1)
    side = max(5.5, 0.62 * c + 3.4)
    fig = new_figure(2 * side + 1.0, side + (0.5 if title else 0))
    ax_counts, ax_norm = fig.subplots(1, 2)
    fig.get_layout_engine().set(wspace=0.04)  # air between colour bar 1 and panel 2
    text_size = 11 if c <= 8 else 9 if c <= 12 else 7
    for ax, normalize, fmt, panel_title in (
        (ax_counts, None, "d", "Counts"),
        (ax_norm, "true", ".2f", "Row-normalised (recall per class)"),
    ):
        display = ConfusionMatrixDisplay.from_predictions(
            labels, pred, labels=np.arange(c), display_labels=names, normalize=normalize,
            values_format=fmt, cmap="Blues", ax=ax, colorbar=False,
            text_kw={"fontsize": text_size},
        )
        # A colour bar attached to the matrix itself, so that it has the matrix's height.
        fig.colorbar(display.im_, cax=ax.inset_axes([1.03, 0.0, 0.04, 1.0]))
        _style_tick_labels(ax)
        ax.set_title(panel_title)
        ax.set_xlabel("Predicted label")
        ax.set_ylabel("True label")
    heading = f"Confusion matrix (N = {labels.size})"
    suptitle(fig, f"{title}: {heading[0].lower()}{heading[1:]}" if title else heading)
    return save(fig, path)


@styled
def plot_roc(probs, labels, class_names, path, *, title: str = "") -> pathlib.Path:
    """One-vs-rest ROC curve and AUC per class; macro-average AUC in the title.

    A class without positives (or without negatives) in ``labels`` has no ROC curve:
    it is left out and named in the legend. The macro average is the mean AUC over
    the classes drawn (the ``auc_ovr`` of :mod:`crckd_jax.metrics`).
    """
    probs, labels, names = check_eval(probs, labels, class_names)
    colors = class_colors(len(names))
    fig = new_figure(10.5, 6.6 + (0.4 if title else 0))
    ax = fig.subplots()
    aucs, absent, alone = [], [], []
    for k, name in enumerate(names):
        positives = int(np.sum(labels == k))
        if positives == 0 or positives == labels.size:
            (absent if positives == 0 else alone).append(name)
            continue
        fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
        aucs.append(auc(fpr, tpr))
        ax.plot(fpr, tpr, color=colors[k], linewidth=1.8, label=f"{name} (AUC {aucs[-1]:.2f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1.0, label="chance")
    for note, skipped in (("not in labels", absent), ("the only class in labels", alone)):
        if skipped:
            names_text = textwrap.fill(", ".join(skipped), 36)
            ax.plot([], [], linestyle="none", label=f"{note}, no curve:\n{names_text}")
    macro = f"macro-average AUC {np.mean(aucs):.3f}" if aucs else "no class has a ROC curve"
    ax.set_title(f"One-vs-rest ROC curves ({macro})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", frameon=False)
    suptitle(fig, title)
    return save(fig, path)
