"""Checkpoints written by an earlier version (tests/fixtures/legacy, made by make_legacy.py there)
load with today's code and give the same outputs: full forward passes of fwp_lm (DPFP + delta
with every carried-state flag of that version; performer + sum) and fwp_transformer (linear,
delta decoder), and the translation model's incremental greedy decoding."""
import json
import os

import pytest
import torch

pytest.importorskip("fairseq")
from helpers import run_models  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "legacy")


def test_legacy_checkpoints_score_identically():
    with open(os.path.join(FIXTURES, "expected.json")) as f:
        expected = json.load(f)
    got = run_models(FIXTURES)
    assert sorted(got) == sorted(expected)
    for name in expected:
        a, b = torch.tensor(got[name]), torch.tensor(expected[name])
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
