import os

import pytest
import torch
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


@pytest.fixture
def one_thread():
    """One torch thread (tiny ops are dominated by thread hand-offs on a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
