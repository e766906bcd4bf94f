"""Shared figure plumbing: Agg figures outside pyplot, paper style, input checks.

Figures are :class:`matplotlib.figure.Figure` objects rendered with the Agg canvas,
never through ``pyplot``: nothing is registered in pyplot's figure list, the active
backend is left alone, and each figure is released once saved.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 140
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


def new_figure(width: float, height: float) -> Figure:
    """An Agg-backed figure of ``width`` x ``height`` inches, constrained layout."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path) -> pathlib.Path:
    """Write ``fig`` as a PNG at ``path`` (parents created; atomically: a complete file or
    the previous one, also when processes sharing a workdir write it), release it, return
    the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=DPI, facecolor="white")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        fig.clear()
    return path


def styled(fn):
    """Run a plotting function under :data:`STYLE` (figure creation and saving)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def is_number(value) -> bool:
    """A finite real number (not a bool)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def series(records: Sequence[Mapping], xkey: str, ykey: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the records holding finite numbers under both keys, sorted by x."""
    pairs = [(float(r[xkey]), float(r[ykey])) for r in records
             if is_number(r.get(xkey)) and is_number(r.get(ykey))]
    pairs.sort(key=lambda p: p[0])
    if not pairs:
        return np.empty(0), np.empty(0)
    x, y = zip(*pairs)
    return np.asarray(x), np.asarray(y)


def class_colors(num_classes: int) -> list:
    """One colour per class (tab10 up to 10 classes, tab20 beyond)."""
    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num_classes)]


def check_eval(probs, labels, class_names):
    """(probs [N, C] float64, labels [N] int64, C names), or ValueError on a mismatch."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be [N] = [{probs.shape[0]}], got {labels.shape}")
    c = probs.shape[1]
    names = class_names_for(class_names, c)
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be in [0, {c}), got [{labels.min()}, {labels.max()}]")
    return probs, labels, names


def class_names_for(class_names, num_classes: int) -> list[str]:
    """``class_names`` as strings (``class i`` when None); ValueError on a count mismatch."""
    if class_names is None:
        return [f"class {i}" for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def suptitle(fig: Figure, title: str) -> None:
    """A bold figure title, when ``title`` is not empty."""
    if title:
        fig.suptitle(title, fontweight="bold")
