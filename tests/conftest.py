import os

import pytest
import torch

# Tests are sized for 2-core machines; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, skipped by `make test` (run `make test-slow`)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture
def shared_data():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared data folder {path} is absent (only on this team's machines)")
    return path
