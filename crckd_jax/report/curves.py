"""Training curves: loss terms and learning rate against the step, metrics against the epoch.

Input: the run's logged records (dicts, e.g. the lines of its JSONL history). Output:
one PNG, ``training_curves.png`` in :func:`crckd_jax.report.write_report`.
"""

from __future__ import annotations

import math
import pathlib
import warnings
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator

from crckd_jax.objective import LOSS_KEYS
from crckd_jax.report._figure import new_figure, save, series, styled, suptitle

__all__ = ["plot_training_curves", "PLOTTED_METRICS", "METRIC_TITLES", "LOSS_LABELS"]

#: Evaluation metrics plotted against the epoch, when the records have them.
PLOTTED_METRICS = ("acc", "bacc", "f1", "auc_ovr", "auc_ovo", "kappa")
METRIC_TITLES = {
    "acc": "Accuracy",
    "bacc": "Balanced accuracy",
    "f1": "Macro F1",
    "auc_ovr": "AUC (one-vs-rest)",
    "auc_ovo": "AUC (one-vs-one)",
    "kappa": "Quadratic kappa",
}
LOSS_LABELS = {
    "loss": "total",
    "ce": "CE",
    "mt": "mean teacher",
    "ccd": "CCD",
    "crp": "CRP",
}

_MODEL_STYLES = {"student": ("-", "o"), "teacher": ("--", "s")}


def _eval_groups(records: Sequence[Mapping]) -> dict[str, tuple[list[Mapping], dict]]:
    """Evaluation records grouped by split and (when recorded) model, in first-seen order.

    Each group gets its line style: the colour tells the split, the dash and marker
    the model (solid circles for the student or an unnamed model, dashed squares for
    the teacher).
    """
    colors = matplotlib.colormaps["tab10"].colors
    splits: list[str] = []
    groups: dict[str, tuple[list[Mapping], dict]] = {}
    for r in records:
        split = str(r.get("split"))
        model = r.get("model")
        label = split if model is None else f"{split} ({model})"
        if split not in splits:
            splits.append(split)
        if label not in groups:
            default = ("-", "o") if model is None else (":", "^")
            linestyle, marker = _MODEL_STYLES.get(model, default)
            style = {"color": colors[splits.index(split) % len(colors)],
                     "linestyle": linestyle, "marker": marker}
            groups[label] = ([], style)
        groups[label][0].append(r)
    return groups


def _plot_losses(ax, train: Sequence[Mapping]) -> None:
    all_y = []
    for key in LOSS_KEYS:
        x, y = series(train, "step", key)
        if x.size == 0:
            continue
        all_y.append(y)
        ax.plot(x, y, label=LOSS_LABELS.get(key, key),
                linewidth=2.2 if key == "loss" else 1.4,
                color="black" if key == "loss" else None,
                marker="o" if x.size == 1 else None)
    if all_y and np.concatenate(all_y).min() > 0:
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
    else:
        ax.set_ylabel("loss")
    ax.set_xlabel("step")
    ax.set_title("Training loss terms")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _plot_lr(ax, train: Sequence[Mapping]) -> None:
    x, y = series(train, "step", "learning_rate")
    ax.plot(x, y, color="tab:purple", linewidth=1.6, marker="o" if x.size == 1 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(True, alpha=0.3)


def _plot_metric(ax, groups: Mapping[str, tuple[Sequence[Mapping], dict]], key: str) -> None:
    for label, (records, style) in groups.items():
        x, y = series(records, "epoch", key)
        if x.size:
            ax.plot(x, y, markersize=4, linewidth=1.6, label=label, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(METRIC_TITLES.get(key, key))
    ax.grid(True, alpha=0.3)


@styled
def plot_training_curves(history: Sequence[Mapping], path, *,
                         title: str = "") -> pathlib.Path | None:
    """Loss terms and learning rate vs step, evaluation metrics vs epoch.

    ``history`` is the list of logged records (dicts, e.g. the lines of the run's
    JSONL file). Records with ``split == "train"`` feed the loss (``loss, ce, mt,
    ccd, crp``, those present; log scale when all are positive) and learning-rate
    panels; every other record is an evaluation whose metrics (``acc, bacc, f1,
    auc_ovr, auc_ovo, kappa``, those present) are drawn against ``epoch``, one line
    per split and model. Returns ``None`` with a warning when there is nothing to plot.
    """
    history = [r for r in history if isinstance(r, Mapping)]
    train = [r for r in history if r.get("split") == "train"]
    evals = [r for r in history if r.get("split") not in (None, "train")]
    has_loss = any(series(train, "step", k)[0].size for k in LOSS_KEYS)
    has_lr = series(train, "step", "learning_rate")[0].size > 0
    groups = _eval_groups(evals)
    metrics = [k for k in PLOTTED_METRICS
               if any(series(g, "epoch", k)[0].size for g, _ in groups.values())]
    if not (has_loss or has_lr or metrics):
        warnings.warn("training history has no plottable records; training curves skipped",
                      stacklevel=2)
        return None

    ncols = 3
    metric_rows = math.ceil(len(metrics) / ncols)
    top = has_loss or has_lr
    width = 15 if metrics or has_lr else 12
    fig = new_figure(width, 4.6 * (int(top) + metric_rows) + (0.5 if title else 0))
    if top and metrics:
        top_fig, bottom_fig = fig.subfigures(2, 1, height_ratios=[1, metric_rows])
    else:
        top_fig, bottom_fig = (fig, None) if top else (None, fig)

    if top:
        panels = [p for p, on in (("loss", has_loss), ("lr", has_lr)) if on]
        axes = top_fig.subplots(1, len(panels), squeeze=False,
                                width_ratios=[2, 1] if len(panels) == 2 else None)[0]
        for ax, panel in zip(axes, panels):
            (_plot_losses if panel == "loss" else _plot_lr)(ax, train)

    if metrics:
        axes = bottom_fig.subplots(metric_rows, ncols, squeeze=False).ravel()
        for ax, key in zip(axes, metrics):
            _plot_metric(ax, groups, key)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        legend = {}
        for ax in axes[:len(metrics)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        with_model = any(r.get("model") is not None for r in evals)
        bottom_fig.legend(legend.values(), legend.keys(), loc="outside lower center",
                          ncols=min(len(legend), 6), frameon=False,
                          title="evaluation split (model)" if with_model else "evaluation split")
    suptitle(fig, title)
    return save(fig, path)
