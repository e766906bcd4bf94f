"""APTOS 2019 (train.csv + train_images/) with the reference hyper-parameters.

`--config aptos:ARG` (or `--config configs/aptos.py:ARG` in a clone) with ARG one of
baseline | mt | mt_ccd | crckd (default), and/or `reference` for the authors' run (batch 64 in
BatchNorm groups of 32, the bank memory, their BatchNorm and learning-rate quirks:
`crckd_jax.protocols.REFERENCE_PROTOCOL`), e.g. `aptos:reference` or `aptos:mt_ccd,reference`.
The folds equal the reference's StratifiedKFold(5, shuffle=True, random_state=2020).
"""

from crckd_jax import config as config_lib
from crckd_jax import protocols


def get_config(arg: str = ""):
    config = config_lib.default_config()
    config.data.source = "aptos"
    config.data.split_seed = 2020
    protocols.apply_dataset_arguments(config, arg)
    config.lock()
    return config
