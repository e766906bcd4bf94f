"""The summary of a run: views of its per-epoch test metrics (`summarise`), as the run's
`summary.json` and the cross-validation summary hold them."""

from __future__ import annotations

import math

import numpy as np

from crckd_jax.metrics import METRIC_KEYS

# Epochs averaged by the reference's protocol: its test metrics of every epoch with
# (epoch + 1) >= epochs - 10 (0-based epoch), i.e. the last 11, though its log says 10.
MEAN_LAST = 11
MEAN_VIEW = f"mean_last_{MEAN_LAST}"
SUMMARY_VIEWS = ("final", MEAN_VIEW, "best_val")  # the views of `summarise`, in order


def summarise(records: list[dict], model: str = "student") -> dict:
    """The views of the test metrics (`SUMMARY_VIEWS`): final epoch, mean of the last 11
    epochs (the reference's average), and the epoch with the best validation balanced
    accuracy (None without a validation split)."""
    test = [r for r in records if r["split"] == "test" and r.get("model") == model]
    if not test:
        return dict.fromkeys(SUMMARY_VIEWS)
    pick = lambda r: {k: r[k] for k in METRIC_KEYS}
    last = test[-MEAN_LAST:]
    view = {
        "final": pick(test[-1]),
        MEAN_VIEW: {k: float(np.mean([r[k] for r in last])) for k in METRIC_KEYS},
        "best_val": None,
    }
    val = [r for r in records if r["split"] == "val" and r.get("model") == model]
    if val:
        best = max(val, key=lambda r: (r["bacc"], -r["epoch"]))
        match = [r for r in test if r["epoch"] == best["epoch"]]
        view["best_val"] = {**pick(match[0]), "epoch": best["epoch"]}
    return view


def finite(values: list) -> list[float]:
    """The values that are numbers and finite (None, NaN and infinities left out)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_std(values: list) -> dict:
    """{"mean", "std" (population, ddof 0), "n"} of the finite values, as the cross-validation
    summary and the table report a metric across runs; mean and std None when none is finite
    (e.g. a summary written before a metric was recorded)."""
    kept = finite(values)
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept)), "n": len(kept)}
