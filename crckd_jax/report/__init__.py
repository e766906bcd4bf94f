"""Paper-ready PNG figures from what a training run recorded.

:func:`write_report` writes four figures into a folder:

* ``training_curves.png``: loss terms and learning rate against the step (train
  records of the JSONL history) and the evaluation metrics against the epoch, one
  line per split / model (:mod:`.curves`);
* ``confusion_matrix.png``: counts and row-normalised (per-class recall) confusion
  matrices of ``argmax(probs)`` against ``labels`` (:mod:`.classification`);
* ``roc_curves.png``: one-vs-rest ROC curve of every class present in ``labels``,
  with its AUC, and the macro-average AUC over those classes in the title
  (:mod:`.classification`);
* ``tsne_embeddings.png``: 2-D t-SNE of the student's embeddings, coloured by class
  (:mod:`.embedding`).

Each figure also has its own function (``plot_training_curves``, ``plot_confusion``,
``plot_roc``, ``plot_tsne``) that writes one PNG and returns its path, or ``None``
(with a :class:`UserWarning`) when there is nothing it can draw. Figures never go
through ``pyplot`` (see :mod:`._figure`).
"""

from __future__ import annotations

import pathlib
import warnings

from crckd_jax.report.classification import plot_confusion, plot_roc
from crckd_jax.report.curves import plot_training_curves
from crckd_jax.report.embedding import plot_tsne, tsne_perplexity

__all__ = [
    "write_report",
    "plot_training_curves",
    "plot_confusion",
    "plot_roc",
    "plot_tsne",
    "tsne_perplexity",
]


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
