"""A trained run on image files: predictions, and metrics on labelled images.

`predict`: `predict.input` is a folder (every image under it, sorted) or a CSV whose
`predict.image_column` holds image paths (relative to the CSV's folder or absolute) ->
`<workdir>/predictions.csv`: path, predicted class name, one probability column per class.
`evaluate_input` (`--mode eval` with `eval.input`): a folder with one subfolder per class,
named as the run's classes, or a CSV with `eval.image_column` and `eval.label_column` (class
names) -> `<workdir>/eval_input.json` with the test metrics, and a per-class report.

Images go through the evaluation transform of training: decoded to RGB, resized to the
stored size, then to the model size, ImageNet-normalised on the device. The model comes
from `W/export/` or the run's newest checkpoint (`crckd_jax.inference`); the training data
is not read. An image that is missing or cannot be decoded stops the run with one error
naming it, or, with `data.skip_bad_images`, is left out of the output and listed.
"""

from __future__ import annotations

import csv
import os
from typing import Callable, Sequence

import jax
import numpy as np

from crckd_jax import metrics
from crckd_jax.data import sources
from crckd_jax.errors import DataError
from crckd_jax.inference import Model, load_model
from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings


def list_inputs(spec: str, image_column: str) -> list[str]:
    """Image paths named by a folder or a CSV (DataError naming what is wrong)."""
    if not spec:
        raise DataError("config key 'predict.input' is '': expected a folder of images or a CSV")
    if os.path.isdir(spec):
        return _images_under(spec)
    if os.path.isfile(spec):
        rows = sources.read_csv(spec, [image_column])
        base = os.path.dirname(os.path.abspath(spec))
        return [os.path.join(base, r[image_column]) for r in rows]
    raise DataError(f"config key 'predict.input' is {spec!r}: no such folder or CSV file")


def list_labelled(spec: str, image_column: str, label_column: str,
                  class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(image paths, labels [N] int32) of a folder with a subfolder per class or of a CSV
    with a class name per row (DataError naming the folder, row or value that is wrong)."""
    index = {name: k for k, name in enumerate(class_names)}
    if os.path.isdir(spec):
        paths, labels = [], []
        for entry in sorted(os.listdir(spec)):
            folder = os.path.join(spec, entry)
            if not os.path.isdir(folder):
                continue
            if entry not in index:
                raise DataError(f"folder {folder!r} is not named after a class of the model "
                                f"(expected one of {list(class_names)})")
            found = _images_under(folder)
            paths += found
            labels += [index[entry]] * len(found)
        if not paths:
            raise DataError(f"folder {spec!r} has no class subfolder (expected subfolders "
                            f"named {list(class_names)}, each holding that class's images)")
        return paths, np.asarray(labels, np.int32)
    if os.path.isfile(spec):
        rows = sources.read_csv(spec, [image_column, label_column])
        base = os.path.dirname(os.path.abspath(spec))
        labels = []
        for row_number, row in enumerate(rows, start=2):
            if row[label_column] not in index:
                raise DataError(f"{spec}, row {row_number}: {label_column} "
                                f"{row[label_column]!r} is not a class of the model (expected "
                                f"one of {list(class_names)})")
            labels.append(index[row[label_column]])
        return ([os.path.join(base, r[image_column]) for r in rows],
                np.asarray(labels, np.int32))
    raise DataError(f"config key 'eval.input' is {spec!r}: no such folder or CSV file")


def _images_under(folder: str) -> list[str]:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if os.path.splitext(f)[1].lower() in sources.IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"folder {folder!r} holds no image ({list(sources.IMAGE_EXTENSIONS)})")
    return paths


def _good_images(paths: list[str], store: int, skip_bad: bool, bad: list[str]):
    """(position in `paths`, decoded image at the stored size) of each of `paths` in order:
    DataError at the first one that is missing or undecodable, or with `skip_bad` that one
    left out and appended to `bad`."""
    for position, path in enumerate(paths):
        try:
            yield position, np.asarray(sources.load_rgb(path, store))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e} (data.skip_bad_images=True skips such images)") from None
            bad.append(path)


def _probabilities(model: Model, paths: list[str], settings: Settings,
                   log: Callable[[str], None]) -> tuple[np.ndarray, list[int]]:
    """(class probabilities [M, C], positions in `paths` of those M images): every image
    that can be read (`data.skip_bad_images`: the others are left out and listed)."""
    batch_size = settings.train.batch_size
    bad = []
    images_in = _good_images(paths, model.store_size, settings.data.skip_bad_images, bad)
    probs, kept = [], []
    while True:
        chunk = [item for _, item in zip(range(batch_size), images_in)]
        if not chunk:
            break
        images = [stored for _, stored in chunk]
        padding = [np.zeros_like(images[0])] * (batch_size - len(images))  # one compile
        probs.append(model(images + padding)[:len(chunk)])
        kept += [position for position, _ in chunk]
    if bad:
        log(f"skipped {len(bad)} image(s) that are missing or cannot be decoded: "
            + ", ".join(bad))
    if not kept:
        raise DataError(f"none of the {len(paths)} input images can be read")
    return np.concatenate(probs), kept


def predict(settings: Settings, folder: RunFolder,
            log: Callable[[str], None] = print) -> str:
    """Writes predictions.csv for `predict.input` with the run's model."""
    paths = list_inputs(settings.predict.input, settings.predict.image_column)
    model = load_model(folder.root, log=log)
    probs, kept = _probabilities(model, paths, settings, log)
    names = list(model.class_names)
    out_path = folder.path("predictions.csv")
    if jax.process_index() == 0:
        with open(out_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "predicted"] + [f"prob_{n}" for n in names])
            for position, p in zip(kept, probs):
                writer.writerow([paths[position], names[int(np.argmax(p))]]
                                + [f"{x:.6f}" for x in p])
    log(f"wrote {len(kept)} predictions to {out_path}")
    return out_path


def evaluate_input(settings: Settings, folder: RunFolder,
                   log: Callable[[str], None] = print) -> dict:
    """Test metrics of the run's model on the labelled images of `eval.input` ->
    eval_input.json (the metrics, the input, how many images were used and skipped)."""
    model = load_model(folder.root, log=log)
    paths, labels = list_labelled(settings.eval.input, settings.eval.image_column,
                                  settings.eval.label_column, model.class_names)
    probs, kept = _probabilities(model, paths, settings, log)
    labels = labels[kept]
    scores = metrics.classification_metrics(probs, labels, len(model.class_names))
    log(f"{settings.eval.input} ({len(kept)} images): {metrics.format_metrics(scores)}")
    log(metrics.per_class_report(probs, labels, model.class_names))
    results = {"input": os.path.abspath(settings.eval.input), "num_images": len(kept),
               "num_skipped": len(paths) - len(kept), **scores}
    if jax.process_index() == 0:
        folder.write_json("eval_input.json", results)
    return results
