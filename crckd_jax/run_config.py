"""A run's saved config as a config file: `--config crckd_jax/run_config.py:<W>/config.json`.

`eval` and `predict` load `<W>/config.json` this way when `--config` is not given, so that
`--config.KEY=VALUE` overrides still apply on top of it.
"""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is the run's config, written by "
                         "--mode train: give --config explicitly") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds no config (a JSON object was expected)")
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config
