import pathlib

import pytest

from crckd_jax import config as config_lib

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixture_path():
    """Path of a reference fixture under tests/fixtures/."""
    return lambda name: FIXTURE_DIR / name


def run_config(**sections):
    """`config.default_config()` with each keyword's section updated, e.g.
    `run_config(loss={"preset": "paper"}, memory={"num_positives": 3})`."""
    config = config_lib.default_config()
    for section, values in sections.items():
        config[section].update(values)
    return config
