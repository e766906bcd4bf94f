"""The config dict at the command line's boundary: its defaults, its checks, and the typed
`Settings` made from it.

`configs/*.py` start from `default_config()` (every key of `crckd_jax.settings.SETTINGS`) and
override values; `validate(config)` names the dotted key and what was expected for an unknown
key, a missing key, a wrong type or an out-of-range value, before anything is loaded;
`to_settings(config)` validates and returns the frozen `Settings` that every mode receives.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from crckd_jax.errors import ConfigError
from crckd_jax.models.torch_import import CHECKPOINT_SUFFIXES
from crckd_jax.settings import KEYS, SETTINGS, Settings, default_config

__all__ = ["ConfigError", "KEYS", "SETTINGS", "default_config", "validate",
           "require_initialisation", "to_settings", "flatten"]

_BY_KEY = {s.key: s for s in SETTINGS}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested config or dict."""
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# torchvision's ImageNet checkpoints of the DenseNets (torchvision.models.densenet).
TORCHVISION_WEIGHTS = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad dotted key and what was expected.

    The command line validates once per command (`crckd_jax.cli.execute`, through
    `to_settings`).
    """
    flat = flatten(config)
    for key in flat:
        if key not in _BY_KEY:
            raise ConfigError(f'unknown config key {key!r}; known keys: {", ".join(KEYS)}')
    for setting in SETTINGS:
        key, rule = setting.key, setting.rule
        if key not in flat:
            raise ConfigError(f"missing config key {key!r}: expected {rule.expected}")
        value = flat[key]
        if not _type_ok(value, rule.kind) or not rule.ok(value):
            raise ConfigError(f"config key {key!r} is {value!r}: expected {rule.expected}")
    if flat["data.fold"] >= flat["data.num_folds"]:
        raise ConfigError(
            f"config key 'data.fold' is {flat['data.fold']}: expected an integer in "
            f"[0, {flat['data.num_folds'] - 1}] (data.num_folds={flat['data.num_folds']})"
        )
    if flat["memory.kind"] == "queue" and flat["memory.num_positives"] > flat["memory.queue_size"]:
        raise ConfigError(
            f"config key 'memory.num_positives' is {flat['memory.num_positives']}: expected at "
            f"most memory.queue_size={flat['memory.queue_size']} for the queue memory"
        )
    folds = [int(p) for p in flat["data.folds"].split(",") if p.strip()]
    if any(f >= flat["data.num_folds"] for f in folds):
        raise ConfigError(
            f"config key 'data.folds' is {flat['data.folds']!r}: expected fold numbers in "
            f"[0, {flat['data.num_folds'] - 1}] (data.num_folds={flat['data.num_folds']})"
        )
    pretrained = flat["model.pretrained"]
    if pretrained not in ("", "none") and (not os.path.isfile(pretrained)
                       or not pretrained.lower().endswith(CHECKPOINT_SUFFIXES)):
        raise ConfigError(
            f"config key 'model.pretrained' is {pretrained!r}: expected an existing "
            f"torchvision DenseNet checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), or "
            "'none' for random weights"
        )
    if flat["model.bn_group_size"] and flat["parallel.sync_batch_norm"]:
        raise ConfigError(
            f"config key 'model.bn_group_size' is {flat['model.bn_group_size']}: expected 0 "
            "with parallel.sync_batch_norm=True (groups are per device; synchronised "
            "statistics span all devices)"
        )
    groups = flat["parallel.fold_axis_size"]
    if groups > 1 and flat["parallel.backend"] != "shard_map":
        raise ConfigError(
            f"config key 'parallel.fold_axis_size' is {groups}: expected 1 with "
            f"parallel.backend={flat['parallel.backend']!r} (the fold axis is a shard_map "
            "mesh axis)")
    if flat["parallel.folds_side_by_side"] % groups:
        raise ConfigError(
            f"config key 'parallel.fold_axis_size' is {groups}: expected a divisor of "
            f"parallel.folds_side_by_side={flat['parallel.folds_side_by_side']} (each group "
            "of devices trains the same number of folds)")
    if flat["data.source"] == "csv" and not flat["data.dir"]:
        raise ConfigError(
            "config key 'data.dir' is '': expected the folder of the CSV for " "data.source='csv'"
        )
    if flat["data.source"] in ("ham10000", "isic2018", "aptos") and not flat["data.dir"]:
        raise ConfigError(
            f"config key 'data.dir' is '': expected the downloaded folder for "
            f"data.source={flat['data.source']!r}"
        )


def to_settings(config: ml_collections.ConfigDict) -> Settings:
    """The typed settings of `config` once it passes `validate`."""
    validate(config)
    return Settings.from_dict(config.to_dict())


def require_initialisation(settings: Settings) -> None:
    """Training on a real data set needs `model.pretrained`: the reference's weights file,
    or 'none' for random weights (ConfigError naming torchvision's file otherwise)."""
    pretrained = settings.model.pretrained
    if settings.data.source != "synthetic" and not pretrained:
        name = settings.model.name
        file = TORCHVISION_WEIGHTS.get(name, f"{name}-<hash>.pth")
        raise ConfigError(
            f"config key 'model.pretrained' is '': the reference starts {name} from "
            f"torchvision's ImageNet weights ({file}, "
            f"https://download.pytorch.org/models/{file}); expected the path of that file "
            f"(or its .safetensors/.npz conversion), or 'none' to train from random weights"
        )
