"""A run's saved config as a config file: `--config crckd_jax/run_config.py:<W>/config.json`.

`eval` and `predict` load `<W>/config.json` this way when `--config` is not given, so that
`--config.KEY=VALUE` overrides still apply on top of it.
"""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.lock()
    return config
