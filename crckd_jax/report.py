"""Paper-ready PNG figures from what a training run recorded.

:func:`write_report` writes four figures into a folder:

* ``training_curves.png``: loss terms and learning rate against the step (train
  records of the JSONL history) and the evaluation metrics against the epoch, one
  line per split / model;
* ``confusion_matrix.png``: counts and row-normalised (per-class recall) confusion
  matrices of ``argmax(probs)`` against ``labels``;
* ``roc_curves.png``: one-vs-rest ROC curve of every class present in ``labels``,
  with its AUC, and the macro-average AUC over those classes in the title;
* ``tsne_embeddings.png``: 2-D t-SNE of the student's embeddings, coloured by class.

Each figure also has its own function (``plot_training_curves``, ``plot_confusion``,
``plot_roc``, ``plot_tsne``) that writes one PNG and returns its path, or ``None``
(with a :class:`UserWarning`) when there is nothing it can draw.

Figures are built as :class:`matplotlib.figure.Figure` objects rendered with the
Agg canvas, never through ``pyplot``: nothing is registered in pyplot's figure
list, the active backend is left alone, and each figure is released once saved.
"""

from __future__ import annotations

import functools
import math
import numbers
import pathlib
import textwrap
import warnings
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import ConfusionMatrixDisplay, auc, roc_curve
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from crckd_jax.objective import LOSS_KEYS

__all__ = [
    "write_report",
    "plot_training_curves",
    "plot_confusion",
    "plot_roc",
    "plot_tsne",
    "tsne_perplexity",
]

DPI = 140
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
#: Below this many samples t-SNE is not run.
MIN_TSNE_SAMPLES = 5
#: Font sizes that stay legible when a figure is shrunk to a paper column.
STYLE = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 10.5,
    "ytick.labelsize": 10.5,
    "legend.fontsize": 10.5,
    "legend.title_fontsize": 11,
    "figure.titlesize": 15,
}


# ------------------------------------------------------------------------- internals


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, facecolor="white")
    finally:
        fig.clear()
    return path


def _styled(fn):
    """Run a plotting function under :data:`STYLE` (figure creation and saving)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _is_number(value) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _series(records: Sequence[Mapping], xkey: str, ykey: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the records holding finite numbers under both keys, sorted by x."""
    pairs = [(float(r[xkey]), float(r[ykey])) for r in records
             if _is_number(r.get(xkey)) and _is_number(r.get(ykey))]
    pairs.sort(key=lambda p: p[0])
    if not pairs:
        return np.empty(0), np.empty(0)
    x, y = zip(*pairs)
    return np.asarray(x), np.asarray(y)


def _class_colors(num_classes: int) -> list:
    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num_classes)]


def _check_eval(probs, labels, class_names):
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be [N] = [{probs.shape[0]}], got {labels.shape}")
    c = probs.shape[1]
    names = _names(class_names, c)
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be in [0, {c}), got [{labels.min()}, {labels.max()}]")
    return probs, labels, names


def _names(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return [f"class {i}" for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def _suptitle(fig: Figure, title: str) -> None:
    if title:
        fig.suptitle(title, fontweight="bold")


# ------------------------------------------------------------------- training curves


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
        x, y = _series(train, "step", key)
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
    x, y = _series(train, "step", "learning_rate")
    ax.plot(x, y, color="tab:purple", linewidth=1.6, marker="o" if x.size == 1 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(True, alpha=0.3)


def _plot_metric(ax, groups: Mapping[str, tuple[Sequence[Mapping], dict]], key: str) -> None:
    for label, (records, style) in groups.items():
        x, y = _series(records, "epoch", key)
        if x.size:
            ax.plot(x, y, markersize=4, linewidth=1.6, label=label, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(METRIC_TITLES.get(key, key))
    ax.grid(True, alpha=0.3)


@_styled
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
    has_loss = any(_series(train, "step", k)[0].size for k in LOSS_KEYS)
    has_lr = _series(train, "step", "learning_rate")[0].size > 0
    groups = _eval_groups(evals)
    metrics = [k for k in PLOTTED_METRICS
               if any(_series(g, "epoch", k)[0].size for g, _ in groups.values())]
    if not (has_loss or has_lr or metrics):
        warnings.warn("training history has no plottable records; training curves skipped",
                      stacklevel=2)
        return None

    ncols = 3
    metric_rows = math.ceil(len(metrics) / ncols)
    top = has_loss or has_lr
    width = 15 if metrics or has_lr else 12
    fig = _new_figure(width, 4.6 * (int(top) + metric_rows) + (0.5 if title else 0))
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
    _suptitle(fig, title)
    return _save(fig, path)


# ----------------------------------------------------------------- confusion matrix


def _style_tick_labels(ax) -> None:
    for label in ax.get_xticklabels():
        label.set_rotation(40)
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")


@_styled
def plot_confusion(probs, labels, class_names, path, *, title: str = "") -> pathlib.Path:
    """Confusion matrices of ``argmax(probs)`` vs ``labels``: counts and row-normalised.

    The row-normalised panel shows the recall of each true class (an absent class
    has an all-zero row).
    """
    probs, labels, names = _check_eval(probs, labels, class_names)
    c = len(names)
    pred = np.argmax(probs, axis=1)
    side = max(5.5, 0.62 * c + 3.4)
    fig = _new_figure(2 * side + 1.0, side + (0.5 if title else 0))
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
    _suptitle(fig, f"{title}: {heading[0].lower()}{heading[1:]}" if title else heading)
    return _save(fig, path)


# ----------------------------------------------------------------------- ROC curves


@_styled
def plot_roc(probs, labels, class_names, path, *, title: str = "") -> pathlib.Path:
    """One-vs-rest ROC curve and AUC per class; macro-average AUC in the title.

    A class without positives (or without negatives) in ``labels`` has no ROC curve:
    it is left out and named in the legend. The macro average is the mean AUC over
    the classes drawn (the ``auc_ovr`` of :mod:`crckd_jax.metrics`).
    """
    probs, labels, names = _check_eval(probs, labels, class_names)
    colors = _class_colors(len(names))
    fig = _new_figure(10.5, 6.6 + (0.4 if title else 0))
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
    _suptitle(fig, title)
    return _save(fig, path)


# ------------------------------------------------------------------------------ t-SNE


def tsne_perplexity(num_samples: int) -> float:
    """t-SNE perplexity for ``num_samples`` points: 30, lowered so that it stays < N."""
    return float(min(30, max(2, (num_samples - 1) // 3)))


@_styled
def plot_tsne(features, labels, class_names, path, seed: int = 0, *,
              title: str = "") -> pathlib.Path | None:
    """2-D t-SNE of ``features`` [N, F], points coloured by their class in ``labels``.

    Deterministic for a given ``seed``. Features wider than 50 are first reduced to
    50 principal components (the usual t-SNE preprocessing). With fewer than
    :data:`MIN_TSNE_SAMPLES` points the figure is skipped with a warning (``None``).
    """
    features = np.asarray(features).astype(np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be [N, F] and labels [N], got {features.shape} "
                         f"and {labels.shape}")
    n = features.shape[0]
    if n < MIN_TSNE_SAMPLES:
        warnings.warn(f"t-SNE needs at least {MIN_TSNE_SAMPLES} samples, got {n}; "
                      "embedding figure skipped", stacklevel=2)
        return None
    num_classes = (len(class_names) if class_names is not None
                   else int(labels.max()) + 1)
    names = _names(class_names, num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")

    if features.shape[1] > 50 and n > 50:
        features = PCA(n_components=50, random_state=seed).fit_transform(features)
    perplexity = tsne_perplexity(n)
    # One thread: t-SNE's OpenMP threads busy-wait, and on a machine that is busy with
    # other work (e.g. training) they make the fit several times slower (2000 points:
    # 6 s on one thread, 40 s on two contended cores).
    with threadpool_limits(limits=1):
        embedded = TSNE(n_components=2, perplexity=perplexity, init="pca",
                        learning_rate="auto", random_state=seed).fit_transform(features)

    colors = _class_colors(num_classes)
    fig = _new_figure(9.0, 7.0 + (0.4 if title else 0))
    ax = fig.subplots()
    size = 30 if n <= 500 else 12 if n <= 3000 else 5
    for k, name in enumerate(names):
        mask = labels == k
        if mask.any():
            ax.scatter(embedded[mask, 0], embedded[mask, 1], s=size, color=colors[k],
                       alpha=0.8, edgecolors="none", label=f"{name} ({int(mask.sum())})")
    ax.set_title(f"t-SNE of student embeddings (N = {n}, perplexity {perplexity:g})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", frameon=False,
               markerscale=1.5, title="class (count)")
    _suptitle(fig, title)
    return _save(fig, path)


# ------------------------------------------------------------------------------ report


def write_report(out_dir, history, evaluation, class_names, *,
                 title: str = "") -> list[pathlib.Path]:
    """Write the run's figures into ``out_dir`` (created if needed); return their paths.

    ``history``: the logged records (see :func:`plot_training_curves`); may be empty.
    ``evaluation``: a mapping with ``probs`` [N, C], ``labels`` [N] (int) and
    optionally ``features`` [N, F] (the student's test-fold embeddings); may be
    ``None``. A figure whose inputs are missing or too small is skipped with a
    warning; only the figures written are returned.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path | None] = []
    if history:
        written.append(plot_training_curves(history, out / "training_curves.png", title=title))
    else:
        warnings.warn("empty training history; training curves skipped", stacklevel=2)

    evaluation = evaluation or {}
    probs, labels = evaluation.get("probs"), evaluation.get("labels")
    if probs is not None and labels is not None:
        written.append(plot_confusion(probs, labels, class_names, out / "confusion_matrix.png",
                                      title=title))
        written.append(plot_roc(probs, labels, class_names, out / "roc_curves.png", title=title))
    else:
        warnings.warn("evaluation has no probs/labels; confusion matrix and ROC skipped",
                      stacklevel=2)
    features = evaluation.get("features")
    if features is not None and labels is not None:
        written.append(plot_tsne(features, labels, class_names, out / "tsne_embeddings.png",
                                 title=title))
    else:
        warnings.warn("evaluation has no features/labels; t-SNE figure skipped", stacklevel=2)
    return [p for p in written if p is not None]
