"""A trained checkpoint + images -> `<workdir>/predictions.csv` with class probabilities.

`predict.input` is a folder (every image under it, sorted) or a CSV whose
`predict.image_column` holds image paths (relative to the CSV's folder or absolute). Images
go through the evaluation transform of training: decoded to RGB, resized to the stored
size, then to the model size, ImageNet-normalised on the devices. Each row of the output: path, predicted
class name, one probability column per class. An image that is missing or cannot be decoded
stops the run with one error naming it, or, with `data.skip_bad_images`, is left out of the
output and listed.
"""

from __future__ import annotations

import csv
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from crckd_jax import config as config_lib
from crckd_jax.data import augment, sources
from crckd_jax.data.sources import DataError
from crckd_jax.train import load_trained


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
    """Writes predictions.csv for `predict.input` with the latest checkpoint of `workdir`."""
    paths = list_inputs(config.predict.input, config.predict.image_column)
    trainer, state = load_trained(config, workdir, log=log)
    store, size = config_lib.store_size(config), config.data.image_size
    batch_size = config.train.batch_size
    probs, kept, bad = [], [], []
    images_in = _good_images(paths, store, config.data.skip_bad_images, bad)
    while True:
        chunk = [item for _, item in zip(range(batch_size), images_in)]
        if not chunk:
            break
        images = np.zeros((batch_size, size, size, 3), np.uint8)  # normalised on device
        for i, (path, stored) in enumerate(chunk):
            images[i] = np.asarray(augment.resize(stored, size))
        local = trainer.parallel.process_rows({"image": images})
        out = trainer.eval_step[False](state, trainer.parallel.put_batch(local))
        probs.append(trainer.parallel.gather_examples(out)["probs"][:len(chunk)])
        kept += [path for path, _ in chunk]
    if bad:
        log(f"skipped {len(bad)} image(s) that are missing or cannot be decoded: "
            + ", ".join(bad))
    if not kept:
        raise DataError(f"none of the {len(paths)} input images can be read")
    paths = kept
    probs = np.concatenate(probs)
    names = list(trainer.data.class_names)
    out_path = os.path.join(workdir, "predictions.csv")
    if jax.process_index() == 0:
        with open(out_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "predicted"] + [f"prob_{n}" for n in names])
            for path, p in zip(paths, probs):
                writer.writerow([path, names[int(np.argmax(p))]] + [f"{x:.6f}" for x in p])
    log(f"wrote {len(paths)} predictions to {out_path}")
    return out_path
