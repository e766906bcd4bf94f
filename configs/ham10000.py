"""HAM10000 (or the ISIC 2018 Task 3 layout) with the reference hyper-parameters.

Defined in `crckd_jax/configs/ham10000.py`, which `--config ham10000[:arg]` names directly; this
file keeps `--config configs/ham10000.py[:arg]` working.
"""

from crckd_jax.configs.ham10000 import get_config  # noqa: F401
