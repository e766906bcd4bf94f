"""Figures of crckd_jax.report: files written, valid PNGs, edge cases do not crash."""

import pathlib
import warnings

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

from crckd_jax import report
from crckd_jax.report import curves

CLASS_NAMES = ["mel", "nv", "bcc", "akiec", "bkl", "df", "Proliferative DR"]
C = len(CLASS_NAMES)
FIGURES = ["training_curves.png", "confusion_matrix.png", "roc_curves.png",
           "tsne_embeddings.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_history(epochs=4, steps_per_epoch=20, log_every=5, drop=(), splits=("test",),
                 models=(None,)):
    """Train records every ``log_every`` steps and one eval record per epoch, split and model."""
    rng = np.random.default_rng(0)
    history = []
    for epoch in range(epochs):
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch, log_every):
            ce = 2.0 * np.exp(-step / 40) + 0.1 * rng.random()
            record = {"split": "train", "step": step, "epoch": step / steps_per_epoch,
                      "loss": ce + 0.6, "ce": ce, "mt": 0.05, "ccd": 0.3, "crp": 0.25,
                      "learning_rate": 1e-3 * (1 - step / (epochs * steps_per_epoch))}
            history.append({k: v for k, v in record.items() if k not in drop})
        for split in splits:
            for model in models:
                score = 0.5 + 0.08 * epoch + 0.02 * rng.random()
                record = {"split": split, "epoch": epoch, "step": (epoch + 1) * steps_per_epoch,
                          "acc": score + 0.05, "bacc": score, "f1": score - 0.05,
                          "auc_ovr": score + 0.2, "auc_ovo": score + 0.15, "kappa": score - 0.1}
                if model is not None:
                    record["model"] = model
                history.append(record)
    return history


def fake_evaluation(n=60, num_classes=C, seed=0):
    """Probabilities with signal and features clustered by class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    logits = rng.normal(size=(n, num_classes)) + 2.0 * np.eye(num_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    centres = rng.normal(scale=5.0, size=(num_classes, 32))
    features = centres[labels] + rng.normal(size=(n, 32))
    return {"probs": probs.astype(np.float32), "labels": labels,
            "features": features.astype(np.float32)}


def assert_png(path, min_width=400):
    path = pathlib.Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert path.stat().st_size > 10_000, path
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert width > min_width and height > 300, (path, image.shape)
    # Not a blank canvas.
    assert np.ptp(image[..., :3]) > 0.5, path


def test_write_report_writes_all_figures(tmp_path):
    history = fake_history(splits=("val", "test"), models=("student", "teacher"))
    out = tmp_path / "nested" / "report"
    figures_before = plt.get_fignums()
    paths = report.write_report(out, history, fake_evaluation(), CLASS_NAMES,
                                title="CRCKD test run")
    assert [p.name for p in paths] == FIGURES
    assert all(p.parent == out for p in paths)
    for path in paths:
        assert_png(path)
    # Figures are not left open in pyplot.
    assert plt.get_fignums() == figures_before


def test_class_missing_from_labels(tmp_path):
    evaluation = fake_evaluation()
    labels = evaluation["labels"].copy()
    labels[labels == 5] = 0  # class 'df' never occurs
    evaluation["labels"] = labels
    with warnings.catch_warnings():
        # No UndefinedMetricWarning (a UserWarning) or division warning leaks out.
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("error", RuntimeWarning)
        paths = report.write_report(tmp_path, fake_history(), evaluation, CLASS_NAMES)
    assert [p.name for p in paths] == FIGURES
    for path in paths:
        assert_png(path)


def test_roc_with_a_single_class_present(tmp_path):
    evaluation = fake_evaluation()
    labels = np.zeros_like(evaluation["labels"])
    path = report.plot_roc(evaluation["probs"], labels, CLASS_NAMES, tmp_path / "roc.png")
    assert_png(path)


def test_tsne_skipped_for_tiny_sets(tmp_path):
    evaluation = fake_evaluation(n=4)
    with pytest.warns(UserWarning, match="t-SNE"):
        paths = report.write_report(tmp_path, fake_history(), evaluation, CLASS_NAMES)
    assert [p.name for p in paths] == FIGURES[:3]
    assert not (tmp_path / "tsne_embeddings.png").exists()
    for path in paths:
        assert_png(path)


@pytest.mark.parametrize("n", [5, 9, 12])
def test_tsne_small_sets_adapt_perplexity(tmp_path, n):
    assert report.tsne_perplexity(n) < n
    evaluation = fake_evaluation(n=n)
    path = report.plot_tsne(evaluation["features"], evaluation["labels"], CLASS_NAMES,
                            tmp_path / "tsne.png")
    assert_png(path)


def test_tsne_is_deterministic(tmp_path):
    evaluation = fake_evaluation(n=30)
    args = (evaluation["features"], evaluation["labels"], CLASS_NAMES)
    first = report.plot_tsne(*args, tmp_path / "a.png", seed=3)
    second = report.plot_tsne(*args, tmp_path / "b.png", seed=3)
    np.testing.assert_array_equal(mpimg.imread(first), mpimg.imread(second))


def loss_panel(history):
    """(y scale, line labels) of the loss panel drawn from `history`'s train records."""
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    curves._plot_losses(ax, [r for r in history if r["split"] == "train"])
    return ax.get_yscale(), [line.get_label() for line in ax.get_lines()]


def test_history_without_some_loss_terms(tmp_path):
    history = fake_history(drop=("mt", "crp", "learning_rate"))
    assert loss_panel(history)[1] == ["total", "CE", "CCD"]
    assert loss_panel(fake_history())[1] == ["total", "CE", "mean teacher", "CCD", "CRP"]
    path = report.plot_training_curves(history, tmp_path / "curves.png")
    assert_png(path)


def test_history_with_only_train_records(tmp_path):
    history = [r for r in fake_history() if r["split"] == "train"]
    path = report.plot_training_curves(history, tmp_path / "curves.png")
    assert_png(path)


def test_history_with_only_eval_records(tmp_path):
    history = [r for r in fake_history() if r["split"] != "train"]
    path = report.plot_training_curves(history, tmp_path / "curves.png")
    assert_png(path)


def test_history_with_non_positive_loss_uses_linear_scale(tmp_path):
    history = fake_history()
    assert loss_panel(history)[0] == "log"
    history[0]["mt"] = 0.0
    assert loss_panel(history)[0] == "linear"
    path = report.plot_training_curves(history, tmp_path / "curves.png")
    assert_png(path)


def test_empty_history_is_skipped(tmp_path):
    with pytest.warns(UserWarning, match="no plottable records"):
        assert report.plot_training_curves([{"split": "train"}], tmp_path / "x.png") is None
    with pytest.warns(UserWarning, match="training curves skipped"):
        paths = report.write_report(tmp_path, [], fake_evaluation(), CLASS_NAMES)
    assert [p.name for p in paths] == FIGURES[1:]


def test_evaluation_without_features(tmp_path):
    evaluation = fake_evaluation()
    del evaluation["features"]
    with pytest.warns(UserWarning, match="t-SNE"):
        paths = report.write_report(tmp_path, fake_history(), evaluation, CLASS_NAMES)
    assert [p.name for p in paths] == FIGURES[:3]


def test_class_names_must_match_probs(tmp_path):
    evaluation = fake_evaluation()
    with pytest.raises(ValueError, match="class names"):
        report.plot_confusion(evaluation["probs"], evaluation["labels"], CLASS_NAMES[:-1],
                              tmp_path / "cm.png")
