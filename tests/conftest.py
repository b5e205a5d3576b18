import os

import pytest
from tiny import data_dir


@pytest.fixture(scope="session", autouse=True)
def _offline_data_env():
    """Tests read the shared data and never touch the network."""
    os.environ.setdefault("SIMDIFF_DATA_DIR", str(data_dir()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    yield


@pytest.fixture
def shared_data():
    return data_dir()
