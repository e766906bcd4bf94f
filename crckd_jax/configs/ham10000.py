"""HAM10000 (or the ISIC 2018 Task 3 layout) with the reference hyper-parameters.

`--config ham10000:ARG` (or `--config configs/ham10000.py:ARG` in a clone) with ARG one of
baseline | mt | mt_ccd | crckd (default): the ablations of the paper, which differ only in the
loss weights; and/or `reference` for the authors' run (batch 64 in BatchNorm groups of 32, the
bank memory, their BatchNorm and learning-rate quirks: `crckd_jax.protocols.REFERENCE_PROTOCOL`),
e.g. `ham10000:reference` or `ham10000:mt,reference`.
"""

from crckd_jax import config as config_lib
from crckd_jax import protocols


def get_config(arg: str = ""):
    config = config_lib.default_config()
    config.data.source = "ham10000"
    protocols.apply_dataset_arguments(config, arg)
    config.lock()
    return config
