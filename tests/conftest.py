import pathlib

import pytest

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixture_path():
    """Path of a reference fixture under tests/fixtures/."""
    return lambda name: FIXTURE_DIR / name
