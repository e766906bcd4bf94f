"""The ablation table's figure: each metric's values over the units, per rung; one PNG."""

from __future__ import annotations

import math

import numpy as np

from crckd_jax.report._figure import new_figure, save, styled


@styled
def plot_table(values: dict[str, dict[str, list[float]]], path):
    """One panel per metric (the keys of each rung's dict, in order): the rungs along x, a
    dot per unit (fold and seed) and a bar at their mean. ``values``: {rung: {metric: the
    units' finite values}}; returns the PNG's path."""
    rungs = list(values)
    metrics = list(values[rungs[0]]) if rungs else []
    columns = 4
    rows = max(1, math.ceil(len(metrics) / columns))
    fig = new_figure(3.2 * columns, 2.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    rng = np.random.default_rng(0)  # horizontal jitter of the dots, the same every time
    for ax, metric in zip(axes, metrics):
        for x, rung in enumerate(rungs):
            ys = np.asarray(values[rung][metric], float)
            if ys.size:
                ax.scatter(x + rng.uniform(-0.12, 0.12, ys.size), ys, s=18, alpha=0.8,
                           color=f"C{x}", edgecolors="none")
                ax.hlines(ys.mean(), x - 0.3, x + 0.3, color="black", linewidth=1.5)
        ax.set_title(metric)
        ax.set_xticks(range(len(rungs)), rungs, rotation=30, ha="right")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return save(fig, path)
