"""2-D t-SNE of the student's embeddings [N, F], points coloured by class; one PNG."""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from crckd_jax.report._figure import (class_colors, class_names_for, new_figure, save,
                                      styled, suptitle)

__all__ = ["plot_tsne", "tsne_perplexity", "MIN_TSNE_SAMPLES"]

#: Below this many samples t-SNE is not run.
MIN_TSNE_SAMPLES = 5


def tsne_perplexity(num_samples: int) -> float:
    """t-SNE perplexity for ``num_samples`` points: 30, lowered so that it stays < N."""
    return float(min(30, max(2, (num_samples - 1) // 3)))


@styled
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
    names = class_names_for(class_names, num_classes)
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

    colors = class_colors(num_classes)
    fig = new_figure(9.0, 7.0 + (0.4 if title else 0))
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
    suptitle(fig, title)
    return save(fig, path)
