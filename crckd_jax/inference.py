"""A trained run as a model: `W/export/` and `load_model`, without the training data.

`export(W)` writes `W/export/` from the run's newest checkpoint that restores (read-only),
or with `checkpoint="best_val"` from its best validation epoch's (`W/best_checkpoint`):

    model.json           format, model (name, hidden_dim, num_classes, dtype), class_names,
                         image_size (px, the network's input), store_size (px, the size
                         images are first resized to, as the data set stored them),
                         normalisation (ImageNet mean and std, on 0-1 pixel values), the
                         checkpoint step, and the run's full config
    student.safetensors  the student's parameters and BatchNorm running statistics, float32,
                         keys "params/<module path>" and "batch_stats/<module path>"
    teacher.safetensors  the mean teacher's, same keys (with `teacher=True`)

model.json also records each weights file's SHA-256; `load_model` refuses a file that no
longer matches it (a flipped bit, a truncated copy), naming the file.

`load_model(path)` reads such a folder, or a workdir holding one, or a workdir without one
(from its newest checkpoint, on the first local device), and returns a `Model`: uint8 RGB
images -> class probabilities. Neither reads the data set or changes anything in the run but
`W/export/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Callable, Sequence

import jax
import numpy as np
from flax import traverse_util

from crckd_jax import builder
from crckd_jax.checkpoint import Checkpointer, restore_read_only
from crckd_jax.data import augment as host_augment
from crckd_jax.data import sources
from crckd_jax.errors import CheckpointUnavailable
from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings
from crckd_jax.step import classify

MODEL_FILE = "model.json"
FORMAT = "crckd-jax-export-1"
CHECKPOINTS = ("latest", "best_val")


@dataclasses.dataclass(frozen=True)
class Model:
    """A trained network for inference.

    `model(images)`: uint8 RGB images, an array [N, H, W, 3] or a sequence of [H, W, 3] of
    any sizes, each resized (bilinear) to `store_size` then to `image_size` as evaluation
    does -> class probabilities [N, C] float32 in the order of `class_names`.
    `model.predict_files(paths)` does the same for image files (decoded like the data set's
    images; DataError naming a file that cannot be read).
    """

    class_names: tuple[str, ...]
    image_size: int
    store_size: int
    variables: dict  # {"params": ..., "batch_stats": ...} on the device
    probabilities: Callable  # compiled: (variables, uint8 [N, s, s, 3]) -> [N, C]

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack([self._model_size(_uint8_rgb(x)) for x in images])
        return np.asarray(self.probabilities(self.variables, batch))

    def predict_files(self, paths: Sequence[str]) -> np.ndarray:
        batch = np.stack([self._model_size(np.asarray(sources.load_rgb(p, self.store_size)))
                          for p in paths])
        return np.asarray(self.probabilities(self.variables, batch))

    def _model_size(self, image: np.ndarray) -> np.ndarray:
        stored = np.asarray(host_augment.resize(image, self.store_size))
        return np.asarray(host_augment.resize(stored, self.image_size))


def _uint8_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} "
                         f"{list(image.shape)}")
    return image


def export(workdir: str, teacher: bool = False, checkpoint: str = "latest",
           log: Callable[[str], None] = print) -> str:
    """Writes `W/export/` (replacing an earlier export) from the newest checkpoint that
    restores ("latest") or the best validation epoch's ("best_val"); returns its path."""
    run = _restore_run(workdir, checkpoint, log)
    out = RunFolder(workdir).export
    tmp = out + ".incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from safetensors.numpy import save_file

    models = {"student": run.student} | ({"teacher": run.teacher} if teacher else {})
    digests = {}
    for name, variables in models.items():
        flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
        file = os.path.join(tmp, f"{name}.safetensors")
        save_file({k: np.asarray(v, np.float32) for k, v in flat.items()}, file)
        digests[f"{name}.safetensors"] = _sha256(file)
    c = run.settings
    description = {
        "format": FORMAT,
        "model": {"name": c.model.name, "hidden_dim": c.model.hidden_dim,
                  "num_classes": len(run.class_names), "dtype": c.train.dtype},
        "class_names": list(run.class_names),
        "image_size": c.data.image_size,
        "store_size": c.data.stored_side,
        "normalisation": {"mean": host_augment.IMAGENET_MEAN.tolist(),
                          "std": host_augment.IMAGENET_STD.tolist()},
        "models": sorted(models),
        "checkpoint": checkpoint,
        "checkpoint_step": run.step,
        "sha256": digests,
        "config": c.to_dict(),
    }
    with open(os.path.join(tmp, MODEL_FILE), "w") as f:
        json.dump(description, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"exported {' and '.join(sorted(models))} of checkpoint step {run.step} to {out}")
    return out


def load_model(path: str, teacher: bool = False, checkpoint: str | None = None,
               log: Callable[[str], None] = print) -> Model:
    """The student (or, with `teacher`, the mean teacher) of an export folder, of a workdir
    holding `export/`, or of a workdir's checkpoints: its newest that restores ("latest",
    the default without an export) or its best validation epoch's ("best_val")."""
    folder = path if os.path.isfile(os.path.join(path, MODEL_FILE)) else \
        RunFolder(path).export
    if checkpoint is None and os.path.isfile(os.path.join(folder, MODEL_FILE)):
        return _from_export(folder, teacher)
    run = _restore_run(path, checkpoint or "latest", log)
    return _model(run.settings, run.class_names, run.teacher if teacher else run.student)


def _model(settings: Settings, class_names: Sequence[str],
           variables: dict) -> Model:
    network = builder.network(settings, len(class_names))
    probabilities = jax.jit(lambda v, images: classify(network, v, images)["probs"])
    return Model(tuple(class_names), settings.data.image_size, settings.data.stored_side,
                 variables, probabilities)


def _from_export(folder: str, teacher: bool) -> Model:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    description_path = os.path.join(folder, MODEL_FILE)
    try:
        with open(description_path) as f:
            description = json.load(f)
        if description.get("format") != FORMAT:
            raise ValueError(f"format {description.get('format')!r}, expected {FORMAT!r}")
        settings = Settings.from_dict(description["config"])
        class_names = tuple(description["class_names"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointUnavailable(f"{description_path} is not a crckd-jax export "
                                    f"description: {e}") from None
    name = "teacher" if teacher else "student"
    weights = os.path.join(folder, f"{name}.safetensors")
    if name not in description.get("models", []) or not os.path.isfile(weights):
        raise CheckpointUnavailable(f"{folder} holds no {name} ({weights} is missing); "
                                    f"export it with --mode export"
                                    + (" --config.export.teacher=True" if teacher else ""))
    recorded = description.get("sha256", {}).get(os.path.basename(weights))
    if recorded is not None and _sha256(weights) != recorded:  # earlier exports record none
        raise CheckpointUnavailable(
            f"{weights} is damaged: its SHA-256 is not the one {description_path} recorded "
            f"when it was exported; export the run again (--mode export)")
    try:
        flat = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise CheckpointUnavailable(f"cannot read {weights}: {e}") from None
    network = builder.network(settings, len(class_names))
    size = settings.data.image_size
    expected = jax.eval_shape(lambda: network.init(
        jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False))
    expected = traverse_util.flatten_dict(expected, sep="/")
    problems = [f"{k}: missing" for k in expected if k not in flat]
    problems += [f"{k}: unexpected" for k in flat if k not in expected]
    problems += [f"{k}: shape {list(flat[k].shape)}, expected {list(expected[k].shape)}"
                 for k in expected if k in flat and flat[k].shape != expected[k].shape]
    if problems:
        raise CheckpointUnavailable(
            f"{weights} does not fit model {settings.model.name!r} with {len(class_names)} "
            f"classes ({description_path}): {len(problems)} mismatch(es), e.g. "
            + "; ".join(problems[:3]))
    return _model(settings, class_names,
                  jax.device_put(traverse_util.unflatten_dict(flat, sep="/")))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclasses.dataclass(frozen=True)
class _Run:
    settings: Settings
    class_names: list[str]
    step: int
    student: dict
    teacher: dict


def _restore_run(workdir: str, checkpoint: str, log: Callable[[str], None]) -> _Run:
    """The newest checkpoint of `workdir` that restores, or of its best validation epoch's
    folder, on the first local device."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    folder = RunFolder(workdir)
    if not os.path.isdir(folder.checkpoints):
        raise CheckpointUnavailable(f"no trained run in {os.path.abspath(workdir)}: it has "
                                    f"no checkpoints folder (train first, or give the "
                                    f"workdir of a run)")
    directory = folder.checkpoints if checkpoint == "latest" else folder.best_checkpoint
    if not os.path.isdir(directory):
        raise CheckpointUnavailable(f"no best validation checkpoint in "
                                    f"{os.path.abspath(directory)}: the run has no "
                                    f"validation split (data.val_fraction)")
    restored = restore_read_only(directory, Checkpointer.single_device_target, workdir, log)
    try:
        settings = Settings.from_dict(restored.meta["config"])
        class_names = list(restored.meta["class_names"])
    except (KeyError, TypeError) as e:
        raise CheckpointUnavailable(
            f"checkpoint step {restored.step} in {directory} does not hold the settings and "
            f"class names of this version of crckd-jax ({type(e).__name__}: {e})") from None
    state = restored.state
    return _Run(settings, class_names, restored.step,
                {"params": state["params"]["student"], "batch_stats": state["batch_stats"]},
                {"params": state["ema_params"], "batch_stats": state["ema_batch_stats"]})
