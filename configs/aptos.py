"""APTOS 2019 (train.csv + train_images/) with the reference hyper-parameters.

Defined in `crckd_jax/configs/aptos.py`, which `--config aptos[:arg]` names directly; this
file keeps `--config configs/aptos.py[:arg]` working.
"""

from crckd_jax.configs.aptos import get_config  # noqa: F401
