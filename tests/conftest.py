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


@pytest.fixture(scope="session")
def tiny_lm_corpus(tmp_path_factory):
    """Binarised LM data (lm-bin/: train, valid, test) of 1- to 8-word lines over 12 words,
    shared by the precision, checkpoint and distributed tests."""
    import random
    from test_cli import WORDS, run, write_lines
    root = tmp_path_factory.mktemp("tiny_lm")
    rng = random.Random(0)
    for split, n in (("train", 300), ("valid", 20), ("test", 12)):
        write_lines(root / f"{split}.txt", [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
                                            for _ in range(n)])
    run("fairseq-preprocess", "--only-source", "--destdir", root / "lm-bin", "--workers", "1",
        *[x for s in ("train", "valid", "test") for x in (f"--{s}pref", root / f"{s}.txt")])
    return root
