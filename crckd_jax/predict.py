"""A trained run + images -> `<workdir>/predictions.csv` with class probabilities.

`predict.input` is a folder (every image under it, sorted) or a CSV whose
`predict.image_column` holds image paths (relative to the CSV's folder or absolute). Images
go through the evaluation transform of training: decoded to RGB, resized to the stored
size, then to the model size, ImageNet-normalised on the device. The model comes from
`W/export/` or the run's newest checkpoint (`crckd_jax.inference`); the training data is
not read. Each row of the output: path, predicted class name, one probability column per
class. An image that is missing or cannot be decoded stops the run with one error naming
it, or, with `data.skip_bad_images`, is left out of the output and listed.
"""

from __future__ import annotations

import csv
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from crckd_jax.data import sources
from crckd_jax.data.sources import DataError
from crckd_jax.inference import load_model


def list_inputs(spec: str, image_column: str) -> list[str]:
    """Image paths named by a folder or a CSV (DataError naming what is wrong)."""
    if not spec:
        raise DataError("config key 'predict.input' is '': expected a folder of images or a CSV")
    if os.path.isdir(spec):
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                       if os.path.splitext(f)[1].lower() in sources.IMAGE_EXTENSIONS)
        if not paths:
            raise DataError(f"folder {spec!r} holds no image ({list(sources.IMAGE_EXTENSIONS)})")
        return paths
    if os.path.isfile(spec):
        rows = sources.read_csv(spec, [image_column])
        base = os.path.dirname(os.path.abspath(spec))
        return [os.path.join(base, r[image_column]) for r in rows]
    raise DataError(f"config key 'predict.input' is {spec!r}: no such folder or CSV file")


def _good_images(paths: list[str], store: int, skip_bad: bool, bad: list[str]):
    """(path, decoded image at the stored size) of each of `paths` in order: DataError at the
    first one that is missing or undecodable, or with `skip_bad` that one left out and
    appended to `bad`."""
    for path in paths:
        try:
            yield path, np.asarray(sources.load_rgb(path, store))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e} (data.skip_bad_images=True skips such images)") from None
            bad.append(path)


def predict(config: ml_collections.ConfigDict, workdir: str,
            log: Callable[[str], None] = print) -> str:
    """Writes predictions.csv for `predict.input` with the run's model (`W/export/`, or the
    newest checkpoint that restores); the training data is not read."""
    paths = list_inputs(config.predict.input, config.predict.image_column)
    model = load_model(workdir, log=log)
    batch_size = config.train.batch_size
    probs, kept, bad = [], [], []
    images_in = _good_images(paths, model.store_size, config.data.skip_bad_images, bad)
    while True:
        chunk = [item for _, item in zip(range(batch_size), images_in)]
        if not chunk:
            break
        images = [stored for _, stored in chunk]
        padding = [np.zeros_like(images[0])] * (batch_size - len(images))  # one compile
        probs.append(model(images + padding)[:len(chunk)])
        kept += [path for path, _ in chunk]
    if bad:
        log(f"skipped {len(bad)} image(s) that are missing or cannot be decoded: "
            + ", ".join(bad))
    if not kept:
        raise DataError(f"none of the {len(paths)} input images can be read")
    paths = kept
    probs = np.concatenate(probs)
    names = list(model.class_names)
    out_path = os.path.join(workdir, "predictions.csv")
    if jax.process_index() == 0:
        with open(out_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "predicted"] + [f"prob_{n}" for n in names])
            for path, p in zip(paths, probs):
                writer.writerow([path, names[int(np.argmax(p))]] + [f"{x:.6f}" for x in p])
    log(f"wrote {len(paths)} predictions to {out_path}")
    return out_path
