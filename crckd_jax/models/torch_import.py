"""Import torchvision DenseNet weights (``state_dict``) into Flax DenseNet variables.

torchvision key -> Flax leaf (``path`` is the dotted module path, e.g.
``features.denseblock1.denselayer1.norm1``)::

    <path>.weight  (conv, [out, in, kh, kw]) -> params/<path>/kernel  [kh, kw, in, out]
    <path>.weight  (BatchNorm, [C])          -> params/<path>/scale
    <path>.bias                              -> params/<path>/bias
    <path>.running_mean                      -> batch_stats/<path>/mean
    <path>.running_var                       -> batch_stats/<path>/var

Keys are normalised first: a leading ``module.`` (DataParallel) is stripped, the old names of
the downloadable torchvision checkpoints (``denselayer1.norm.1.weight``) become current ones
(``denselayer1.norm1.weight``), and ``num_batches_tracked`` entries are dropped.

Files (``load_state_dict``): ``.safetensors`` and ``.npz`` are read with numpy alone;
``.pth``/``.pt``/``.pth.tar`` need PyTorch. ``convert`` writes a ``.safetensors`` file with the
same keys from any of them, where PyTorch is installed::

    crckd-convert-weights densenet121-a639ec97.pth densenet121.safetensors
    python -m crckd_jax.models.torch_import convert densenet121-a639ec97.pth densenet121.safetensors

This module imports JAX and Flax only in ``import_densenet``, so the converter also runs in
an environment that has PyTorch, numpy and safetensors but no JAX.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crckd_jax.errors import CheckpointError

# torchvision's pattern for the pre-0.4 dense-layer names ("norm.1", "conv.2", ...).
_OLD_DENSELAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# torchvision's ImageNet classifier: not part of the backbone, ignored by import_densenet.
_CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
# Flax leaf name -> (collection, torch parameter/buffer name).
_LEAF_TO_TORCH = {
    "kernel": ("params", "weight"),
    "scale": ("params", "weight"),
    "bias": ("params", "bias"),
    "mean": ("batch_stats", "running_mean"),
    "var": ("batch_stats", "running_var"),
}
_TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar")
# The files `load_state_dict` reads (``model.pretrained``).
CHECKPOINT_SUFFIXES = (".safetensors", ".npz") + _TORCH_SUFFIXES


def load_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """Reads a state dict from ``.safetensors``, ``.npz`` or ``.pth``/``.pt``/``.pth.tar``.

    ``.safetensors`` files are read with ``safetensors.numpy.load_file`` and ``.npz`` files
    with ``numpy.load`` (no PyTorch needed). PyTorch files are read with
    ``torch.load(..., map_location='cpu', weights_only=True)`` (PyTorch is imported only
    here); a checkpoint dict holding the state dict under ``'state_dict'`` or ``'model'`` is
    unwrapped. When ``prefix`` is given, only keys starting with it are kept, with the prefix
    removed (e.g. ``'sd/'`` for an ``.npz`` that also stores other arrays). Keys are returned
    as stored (see ``normalize_state_dict_keys``).

    Raises FileNotFoundError for a missing file, ImportError for a PyTorch file without
    PyTorch, and CheckpointError naming the file for an unsupported suffix or a file that
    cannot be parsed in the format its suffix names.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    lowered = path.lower()
    if lowered.endswith(".safetensors"):
        loaded = _read(path, "a safetensors file", _load_safetensors)
    elif lowered.endswith(".npz"):
        loaded = _read(path, "an .npz archive", lambda p: _load_npz(p, prefix))
    elif lowered.endswith(_TORCH_SUFFIXES):
        loaded = _load_torch_state_dict(path)
    else:
        raise CheckpointError(
            f"unsupported checkpoint file {path}: expected one of {CHECKPOINT_SUFFIXES}")
    state_dict = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    if not state_dict:
        raise CheckpointError(f"no entry of {path} has a key starting with {prefix!r}")
    return state_dict


def _read(path: str, what: str, reader) -> dict[str, np.ndarray]:
    """``reader(path)``, with any failure to parse the file as one CheckpointError naming it."""
    try:
        return reader(path)
    except Exception as err:  # the readers' own errors (zipfile, safetensors, pickle) vary
        raise CheckpointError(f"cannot read {path} as {what}: {err}") from err


def _load_npz(path: str, prefix: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k.startswith(prefix)}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def _load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs PyTorch (`pip install torch`, the CPU build is enough); "
            "or convert the checkpoint to .safetensors where PyTorch is available "
            "(crckd-convert-weights)"
        ) from err
    obj = _read(path, "a PyTorch checkpoint",
                lambda p: torch.load(p, map_location="cpu", weights_only=True))
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        state_dict[key] = value.detach().cpu().numpy()
    return state_dict


def normalize_state_dict_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Strips ``module.``, renames old dense-layer keys, drops ``num_batches_tracked``."""
    normalized = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("num_batches_tracked"):
            continue
        match = _OLD_DENSELAYER_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if key in normalized:
            raise CheckpointError(f"state dict has two entries for {key!r} after key normalisation")
        normalized[key] = np.asarray(value)
    return normalized


def classifier_from_state_dict(state_dict: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Returns torchvision's classifier ``(W [num_classes, F], b [num_classes])`` as float32.

    ``logits = pooled @ W.T + b`` with ``pooled`` the ``'pooled'`` output of ``CRCKDNet``.
    """
    sd = normalize_state_dict_keys(state_dict)
    missing = [k for k in _CLASSIFIER_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"state dict has no classifier: missing {missing}")
    return (
        sd["classifier.weight"].astype(np.float32),
        sd["classifier.bias"].astype(np.float32),
    )


def import_densenet(
    state_dict: Mapping[str, Any], variables: Mapping[str, Any], *, name: str = "the template"
) -> dict[str, Any]:
    """Returns ``variables`` with the DenseNet backbone replaced by the checkpoint's weights.

    ``variables`` is a template from ``model.init`` of ``CRCKDNet`` (backbone under
    ``'features'``) or of ``DenseNetFeatures`` (backbone at the top level); only the
    backbone's ``params`` and ``batch_stats`` leaves are replaced, converted to the template
    leaf's layout and dtype as jax arrays. Everything else (e.g. ``fc_layer``,
    ``classifier``) is returned unchanged. The template may be abstract
    (``jax.eval_shape(model.init, ...)``): imported leaves are concrete, the others stay
    ``ShapeDtypeStruct``s that the caller must initialise, so pass a concrete template to get
    a usable head. torchvision's ``classifier.*`` keys are ignored.

    Raises one CheckpointError listing all missing, unexpected and mis-shaped keys (shapes in
    torch layout); ``name`` names the model in that message.
    """
    import jax.numpy as jnp
    from flax import traverse_util

    sd = normalize_state_dict_keys(state_dict)
    in_features = {c: "features" in variables.get(c, {}) for c in ("params", "batch_stats")}
    backbone = {
        c: dict(variables[c]["features"]) if in_features[c] else dict(variables.get(c, {}))
        for c in ("params", "batch_stats")
    }

    expected = {}  # torch key -> (collection, flax path, template leaf)
    for collection, tree in backbone.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            leaf_collection, torch_name = _LEAF_TO_TORCH.get(path[-1], (None, None))
            if leaf_collection != collection:
                raise ValueError(
                    f"{collection}/{'/'.join(path)} is not a DenseNet leaf; is the template a "
                    "DenseNetFeatures or CRCKDNet?"
                )
            torch_key = ".".join(("features",) + path[:-1] + (torch_name,))
            expected[torch_key] = (collection, path, leaf)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and k not in _CLASSIFIER_KEYS]
    mismatched = []
    for key, (_, _, leaf) in expected.items():
        if key in sd and tuple(sd[key].shape) != _torch_shape(leaf.shape):
            mismatched.append(
                f"{key} expected {_torch_shape(leaf.shape)} got {tuple(sd[key].shape)}"
            )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys: {missing}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys: {unexpected}")
        if mismatched:
            problems.append(f"shape mismatch: {', '.join(mismatched)}")
        raise CheckpointError(f"DenseNet checkpoint does not match {name}: {'; '.join(problems)}")

    imported = {c: {} for c in backbone}
    for key, (collection, path, leaf) in expected.items():
        value = sd[key]
        if value.ndim == 4:
            value = np.transpose(value, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]
        imported[collection][path] = jnp.asarray(value, dtype=leaf.dtype)

    result = dict(variables)
    for collection, flat in imported.items():
        if collection not in variables:
            continue
        tree = traverse_util.unflatten_dict(flat)
        if in_features[collection]:
            result[collection] = {**variables[collection], "features": tree}
        else:
            result[collection] = tree
    return result


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax conv kernel [kh, kw, in, out] -> torch [out, in, kh, kw]; other shapes as is."""
    if len(flax_shape) == 4:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    return tuple(flax_shape)


def convert(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Writes the state dict of ``source`` (any file ``load_state_dict`` reads, typically a
    torchvision ``.pth``) to the ``.safetensors`` file ``target``, with its keys unchanged
    (old torchvision names included: the importer renames them when loading). A checkpoint
    dict is unwrapped as by ``load_state_dict``; bfloat16 tensors are stored as float32.
    Returns the number of tensors written.
    """
    from safetensors.numpy import save_file

    target = os.fspath(target)
    if not target.lower().endswith(".safetensors"):
        raise ValueError(f"the converted file must end in .safetensors: {target}")
    state_dict = load_state_dict(source)
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    try:
        save_file(tensors, target,
                  metadata={"format": "pt", "source": os.path.basename(os.fspath(source))})
    except Exception as err:  # safetensors' own error type for an unwritable target
        raise ValueError(f"cannot write {target}: {err}") from err
    umask = os.umask(0)  # safetensors creates the file private (0600): the usual mode instead
    os.umask(umask)
    os.chmod(target, 0o666 & ~umask)
    return len(state_dict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crckd_jax.models.torch_import convert SOURCE TARGET``."""
    parser = argparse.ArgumentParser(
        prog="python -m crckd_jax.models.torch_import",
        description="Tools for torchvision DenseNet checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_convert_arguments(commands.add_parser("convert", help=_CONVERT_HELP,
                                               description=_CONVERT_HELP))
    return _run_convert(parser.parse_args(argv))


def convert_main(argv: Sequence[str] | None = None) -> int:
    """The ``crckd-convert-weights SOURCE TARGET`` command."""
    parser = argparse.ArgumentParser(prog="crckd-convert-weights", description=_CONVERT_HELP)
    _add_convert_arguments(parser)
    return _run_convert(parser.parse_args(argv))


_CONVERT_HELP = (
    "Write a torchvision DenseNet checkpoint (.pth, .pt, .pth.tar; needs PyTorch; or .npz) as "
    ".safetensors with the same keys, for model.pretrained without PyTorch.")


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint to read, e.g. densenet121-a639ec97.pth")
    parser.add_argument("target", help="file to write, e.g. densenet121.safetensors")


def _run_convert(args: argparse.Namespace) -> int:
    try:
        count = convert(args.source, args.target)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} tensors from {args.source} to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
