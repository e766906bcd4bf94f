"""How well embeddings separate the classes: the paper's claim for CCD in numbers.

CRCKD's CCD is said to give the student's features higher intra-class similarity and
inter-class variance. `class_separation` measures both on a set of embeddings (a run's
final test evaluation, `train._finish`) with cosine similarities of the L2-normalised
embeddings to the class centroids, and scikit-learn's silhouette score (cosine distance).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import silhouette_score

SEPARATION_KEYS = ("cos_own_centroid", "cos_other_centroids", "silhouette")


def class_separation(features, labels) -> dict[str, float]:
    """For features [N, F] and integer labels [N], over the classes present:

    * ``cos_own_centroid``: mean over items of the cosine similarity of the item's
      normalised embedding to its own class's centroid (the mean of the class's normalised
      embeddings);
    * ``cos_other_centroids``: mean over items and the other classes present of the cosine
      similarity to those classes' centroids (NaN with one class);
    * ``silhouette``: ``sklearn.metrics.silhouette_score`` with the cosine distance, in
      [-1, 1] (NaN unless 2 <= classes present < N).
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if features.ndim != 2 or labels.shape != (features.shape[0],) or not len(labels):
        raise ValueError(f"expected features [N, F] and labels [N] with N > 0, got "
                         f"{features.shape} and {labels.shape}")
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    classes = np.unique(labels)
    centroids = np.stack([unit[labels == k].mean(axis=0) for k in classes])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    similarity = unit @ centroids.T  # [N, classes present]
    own = np.searchsorted(classes, labels)
    is_own = np.arange(len(classes))[None, :] == own[:, None]
    others = similarity[~is_own]
    silhouette = (float(silhouette_score(unit, labels, metric="cosine"))
                  if 2 <= len(classes) < len(labels) else float("nan"))
    return {"cos_own_centroid": float(similarity[is_own].mean()),
            "cos_other_centroids": float(others.mean()) if others.size else float("nan"),
            "silhouette": silhouette}
