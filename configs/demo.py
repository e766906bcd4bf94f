"""The default job: synthetic dermoscopy-like images in the HAM10000 layout, small model.

Defined in `crckd_jax/configs/demo.py`, which `--config demo[:arg]` names directly; this
file keeps `--config configs/demo.py[:arg]` working.
"""

from crckd_jax.configs.demo import get_config  # noqa: F401
