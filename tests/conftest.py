import os
import random

import pytest
import torch

from helpers import WORDS, run, write_lines

# Tests are sized for 2-core machines; keep torch from oversubscribing them: one thread per
# worker when pytest-xdist runs the suite in parallel processes (make test: -n 2), else two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))

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



@pytest.fixture(scope="module")
def cuda():
    """The CUDA device for the GPU tests; skips with cuda_available()'s reason without one."""
    from fwp_fairseq.ops import cuda_available
    ok, why = cuda_available()
    if not ok:
        pytest.skip(f"impl='cuda' unavailable: {why}")
    return torch.device("cuda")

@pytest.fixture(scope="session")
def tiny_lm_corpus(tmp_path_factory):
    """Binarised LM data (lm-bin/: train, valid, test) of 1- to 8-word lines over 12 words,
    shared by the precision, checkpoint and distributed tests."""
    root = tmp_path_factory.mktemp("tiny_lm")
    rng = random.Random(0)
    for split, n in (("train", 300), ("valid", 20), ("test", 12)):
        write_lines(root / f"{split}.txt", [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
                                            for _ in range(n)])
    run("fairseq-preprocess", "--only-source", "--destdir", root / "lm-bin", "--workers", "1",
        *[x for s in ("train", "valid", "test") for x in (f"--{s}pref", root / f"{s}.txt")])
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A copy task (MT: target = source reversed) and plain text (LM), binarised."""
    root = tmp_path_factory.mktemp("fwp_cli")
    rng = random.Random(0)
    for split, n in (("train", 300), ("valid", 20), ("test", 12)):
        src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        write_lines(root / f"{split}.src", src)
        write_lines(root / f"{split}.tgt", [" ".join(reversed(s.split())) for s in src])
        write_lines(root / f"{split}.txt", src)
    pre = ["--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
           "--workers", "1"]
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        "--destdir", root / "mt-bin", *pre)
    run("fairseq-preprocess", "--only-source", "--destdir", root / "lm-bin", "--workers", "1",
        *[x for split in ("train", "valid", "test") for x in (f"--{split}pref", root / f"{split}.txt")])
    return root
