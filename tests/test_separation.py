"""class_separation: cosine similarity to own and other class centroids, silhouette."""

import numpy as np
import pytest

from crckd_jax.separation import class_separation


def test_separated_classes_have_high_own_and_low_other_similarity():
    """Two classes along orthogonal axes with a little noise: own-centroid similarity near
    1, other-centroid similarity near 0, silhouette near 1; mixed labels give neither."""
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0.0, 0.0]) + 0.05 * rng.normal(size=(20, 3))
    b = np.array([0.0, 3.0, 0.0]) + 0.15 * rng.normal(size=(20, 3))  # length does not count
    features, labels = np.concatenate([a, b]), np.repeat([0, 2], 20)
    got = class_separation(features, labels)
    assert got["cos_own_centroid"] > 0.99 and abs(got["cos_other_centroids"]) < 0.1
    assert got["silhouette"] > 0.9
    mixed = class_separation(features, rng.permutation(labels))
    assert mixed["cos_own_centroid"] < 0.9 and mixed["silhouette"] < 0.2


def test_exact_values_on_a_small_case():
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = np.array([0, 0, 1])
    got = class_separation(features, labels)
    c0 = np.array([1.0, 1.0]) / np.sqrt(2)  # mean of the two unit vectors, normalised
    own = [c0[0], c0[1], 1.0]  # class 1's centroid is its own item
    other = [np.dot([1, 0], [1, 1]) / np.sqrt(2), np.dot([0, 1], [1, 1]) / np.sqrt(2),
             np.dot([1, 1], c0) / np.sqrt(2)]
    assert got["cos_own_centroid"] == pytest.approx(np.mean(own))
    assert got["cos_other_centroids"] == pytest.approx(np.mean(other))


def test_one_class_has_no_other_centroid_or_silhouette():
    got = class_separation(np.eye(3), np.zeros(3, int))
    assert got["cos_own_centroid"] == pytest.approx(1 / np.sqrt(3))
    assert np.isnan(got["cos_other_centroids"]) and np.isnan(got["silhouette"])
    with pytest.raises(ValueError, match="expected features"):
        class_separation(np.ones((3, 2)), np.zeros(2, int))
