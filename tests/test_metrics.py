"""crckd_jax.metrics against the reference metric function and edge cases."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import precision_score, roc_auc_score

from crckd_jax import metrics
from crckd_jax.metrics import classification_metrics, confusion, per_class_report

FIXTURE = Path(__file__).parent / "fixtures" / "metrics.npz"

# our key -> reference key. The reference's "auc_ovo" is computed with one-hot
# targets (scikit-learn then does one-vs-rest); its "auc_macro" is the one-vs-one AUC.
REF_KEY = {
    "acc": "acc",
    "bacc": "bacc",
    "prec": "prec",
    "rec": "rec",
    "f1": "f1",
    "auc_ovr": "auc_ovo",
    "auc_ovo": "auc_macro",
    "spec": "spec",
    "kappa": "kappa",
}


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _pairwise_ovo(labels, probs):
    """Hand & Till: mean over present class pairs of the two directed binary AUCs."""
    scores = []
    for a, b in itertools.combinations(np.unique(labels), 2):
        m = (labels == a) | (labels == b)
        auc_a = roc_auc_score(labels[m] == a, probs[m, a])
        auc_b = roc_auc_score(labels[m] == b, probs[m, b])
        scores.append((auc_a + auc_b) / 2)
    return float(np.mean(scores))


@pytest.mark.filterwarnings("error")
def test_matches_reference(ref):
    out = classification_metrics(ref["probs"], ref["gt"])
    assert set(out) == set(REF_KEY)
    # Same float64 computations on the same inputs: measured difference 0.0 for all
    # nine metrics; rtol 1e-12 only allows for summation-order differences.
    for ours, theirs in REF_KEY.items():
        np.testing.assert_allclose(out[ours], ref[theirs], rtol=1e-12, atol=0, err_msg=ours)
        assert isinstance(out[ours], float)


def test_fixture_probs_are_softmax_of_logits(ref):
    z = ref["logits"].astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ref["probs"], p, rtol=1e-5, atol=1e-7)


def test_specificity_matches_imblearn(ref):
    imblearn_metrics = pytest.importorskip("imblearn.metrics")
    probs, gt = ref["probs"], ref["gt"]
    keep = gt != 1  # also a fold with a missing class
    for p, y in ((probs, gt), (probs[keep], gt[keep])):
        want = imblearn_metrics.specificity_score(y, p.argmax(axis=1), average="macro")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            got = classification_metrics(p, y)["spec"]
        assert got == pytest.approx(want, rel=1e-12)


def test_absent_class(ref):
    probs, gt = ref["probs"], ref["gt"]
    keep = gt != 2
    p, y = probs[keep], gt[keep]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = classification_metrics(p, y, num_classes=5)
    assert len(caught) == 1 and issubclass(caught[0].category, UndefinedMetricWarning)
    assert "[2]" in str(caught[0].message)
    assert all(np.isfinite(v) for v in out.values())
    present = [0, 1, 3, 4]
    want_ovr = np.mean([roc_auc_score(y == k, p[:, k]) for k in present])
    assert out["auc_ovr"] == pytest.approx(want_ovr, rel=1e-12)
    assert out["auc_ovo"] == pytest.approx(_pairwise_ovo(y, p), rel=1e-12)


def test_single_class_gives_nan_aucs(ref):
    probs, gt = ref["probs"], ref["gt"]
    keep = gt == 4
    with pytest.warns(UndefinedMetricWarning):
        out = classification_metrics(probs[keep], gt[keep])
    assert np.isnan(out["auc_ovr"]) and np.isnan(out["auc_ovo"])
    assert np.isfinite(out["acc"]) and np.isfinite(out["kappa"])


@pytest.mark.filterwarnings("error")
def test_rows_not_summing_to_one_are_renormalised(ref):
    probs, gt = ref["probs"].astype(np.float64), ref["gt"]
    probs = probs / probs.sum(axis=1, keepdims=True)
    scale = np.random.default_rng(0).uniform(0.98, 1.02, size=(len(gt), 1))
    scaled = (probs * scale).astype(np.float32)
    with pytest.raises(ValueError, match="sum up to 1"):
        roc_auc_score(gt, scaled, multi_class="ovo")
    out = classification_metrics(scaled, gt)
    # Renormalising recovers `probs` up to float32 rounding, which changes no ranking.
    assert out["auc_ovo"] == pytest.approx(_pairwise_ovo(gt, probs), rel=1e-12)
    assert out["auc_ovo"] == pytest.approx(float(ref["auc_macro"]), rel=1e-12)


@pytest.mark.filterwarnings("error")
def test_never_predicted_class_has_zero_precision_without_warning(ref):
    probs, gt = ref["probs"].astype(np.float64), ref["gt"]
    probs[:, 4] *= 1e-3
    probs /= probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    assert not (pred == 4).any()
    out = classification_metrics(probs, gt)
    want = precision_score(gt, pred, labels=np.arange(5), average=None, zero_division=0)
    assert want[4] == 0
    assert out["prec"] == pytest.approx(want.mean(), rel=1e-12)


def test_argmax_ties_pick_first_index():
    probs = np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_array_equal(
        confusion(probs, np.array([0, 1, 0]), 3),
        [[2, 0, 0], [0, 1, 0], [0, 0, 0]],
    )


def test_confusion_and_report(ref):
    probs, gt = ref["probs"], ref["gt"]
    cm = confusion(probs, gt, 5)
    assert cm.shape == (5, 5) and cm.sum() == len(gt)
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(gt, minlength=5))
    assert np.trace(cm) / len(gt) == pytest.approx(float(ref["acc"]))
    names = ["no DR", "mild", "moderate", "severe", "proliferative"]
    text = per_class_report(probs, gt, names)
    assert isinstance(text, str) and all(n in text for n in names)
    rep = per_class_report(probs, gt, names, output_dict=True)
    assert rep["macro avg"]["precision"] == pytest.approx(float(ref["prec"]), rel=1e-12)
    assert rep["mild"]["support"] == np.sum(gt == 1)


def test_input_validation(ref):
    probs, gt = ref["probs"], ref["gt"]
    with pytest.raises(ValueError):
        classification_metrics(probs, gt, num_classes=4)
    with pytest.raises(ValueError):
        classification_metrics(probs, gt[:-1])
    with pytest.raises(ValueError):
        classification_metrics(probs, np.where(gt == 0, 5, gt))
    with pytest.raises(ValueError):
        classification_metrics(probs, gt.astype(np.float32))


def test_format_metrics_lists_every_metric_in_order():
    values = {k: i / 8 for i, k in enumerate(reversed(metrics.METRIC_KEYS))}
    assert metrics.format_metrics(values) == " ".join(
        f"{k}={values[k]:.4f}" for k in metrics.METRIC_KEYS)
    assert metrics.format_metrics(values).startswith("acc=1.0000 bacc=0.8750 ")
