"""HAM10000 (or the ISIC 2018 Task 3 layout) with the reference hyper-parameters.

`--config ham10000:ARG` (or `--config configs/ham10000.py:ARG` in a clone) with ARG one of
baseline | mt | mt_ccd | crckd (default): the ablations of the paper, which differ only in the
loss weights.
"""

from crckd_jax import config as config_lib


def get_config(arg: str = ""):
    config = config_lib.default_config()
    config.data.source = "ham10000"
    config_lib.apply_ablation(config, arg)
    config.lock()
    return config
