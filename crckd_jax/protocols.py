"""What the real-data configs' argument selects: a paper ablation and/or the authors' run.

`--config ham10000:mt_ccd,reference`: `apply_dataset_arguments` sets the ablation's loss
weights (`ABLATIONS`) and, with `reference`, the settings of the authors' training run
(`REFERENCE_PROTOCOL`) on a config dict, before it is validated.
"""

from __future__ import annotations

import ml_collections

from crckd_jax.errors import ConfigError

# Loss weights (consistency, ccd_weight, crp_weight) of the paper's ablations.
ABLATIONS = {
    "baseline": (0.0, 0.0, 0.0),
    "mt": (1.0, 0.0, 0.0),
    "mt_ccd": (1.0, 0.1, 0.0),
    "crckd": (1.0, 0.1, 1.0),
}

# The authors' training run (train_CRCKD.py with its defaults on two GPUs).
REFERENCE_PROTOCOL = {
    ("train", "batch_size"): 64,  # --batch_size 32 per GPU x 2 GPUs
    ("train", "keep_partial_batch"): True,  # DataLoader(drop_last=False)
    ("model", "bn_group_size"): 32,  # DataParallel: BatchNorm statistics per GPU
    ("model", "reference_double_bn_update"): True,  # second pass of features[0:9]
    ("optim", "reset_lr_each_epoch"): True,  # lr back to 1e-4 at every epoch end
    ("memory", "kind"): "bank",  # one memory row per training item
}


def apply_dataset_arguments(config: ml_collections.ConfigDict, arg: str) -> None:
    """The argument of a real-data config: comma-separated, an ablation (a key of ABLATIONS;
    default crckd) and/or `reference` (REFERENCE_PROTOCOL: the authors' run)."""
    items = [a.strip() for a in arg.split(",") if a.strip()]
    ablations = [a for a in items if a != "reference"]
    if len(ablations) > 1:
        raise ConfigError(f"config argument {arg!r} names {len(ablations)} ablations: expected "
                          f"at most one of {', '.join(ABLATIONS)}, and/or 'reference'")
    apply_ablation(config, ablations[0] if ablations else "")
    if "reference" in items:
        for (section, key), value in REFERENCE_PROTOCOL.items():
            config[section][key] = value


def apply_ablation(config: ml_collections.ConfigDict, arg: str) -> None:
    """Sets the loss weights of ablation `arg` (a key of ABLATIONS; '' = crckd)."""
    arg = arg or "crckd"
    if arg not in ABLATIONS:
        raise ConfigError(
            f'unknown config argument {arg!r}: expected one of {", ".join(ABLATIONS)}, '
            "or 'reference'"
        )
    config.loss.consistency, config.loss.ccd_weight, config.loss.crp_weight = ABLATIONS[arg]
