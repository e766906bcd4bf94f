import os
import pathlib

import pytest

from crckd_jax import config as config_lib
from crckd_jax import xla_options

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures"


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole session, shared by the tests run
    in this process and the `launch.py` (and other) subprocesses they start:
    `$JAX_COMPILATION_CACHE_DIR` when set (e.g. a directory a CI system keeps between
    runs), else the project's default, `~/.cache/crckd_jax/xla`. A second run of the suite
    compiles only what changed; no test's outcome depends on the cache (the tests of the
    cache itself use their own directories)."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = xla_options.default_cache_dir()
    xla_options.enable_compilation_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])


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


def run_settings(**sections):
    """The typed `Settings` of `run_config(**sections)` (not validated: a test may hold a
    value the command line would refuse)."""
    from crckd_jax.settings import Settings

    return Settings.from_dict(run_config(**sections).to_dict())
