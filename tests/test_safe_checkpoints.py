"""Checkpoints are loaded safely (fwp_fairseq/compat/checkpoint_loading.py): a crafted checkpoint
whose unpickling would create a file is refused by the Python API and by every fairseq CLI that
loads one, and the file is not created; every legitimate checkpoint still loads, with exactly
the contents a full (trusted) load gives."""
import builtins

import pytest
import torch

pytest.importorskip("fairseq")
from helpers import COMMON, TRAIN, run  # noqa: E402

import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.compat import checkpoint_loading  # noqa: E402
from fwp_fairseq.compat.checkpoint_loading import TRUST_ENV, CheckpointRefused  # noqa: E402

pytestmark = pytest.mark.skipif(not checkpoint_loading.needed(),
                                reason="this fairseq/torch loads checkpoints safely by itself")

LM = ["--task", "language_modeling", "--tokens-per-sample", "32", "--sample-break-mode", "none",
      "--max-tokens", "256"]
TINY_TRANSFORMER = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
                    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
                    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
                    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]


class _CreatesFile:
    """Unpickled, it calls open(target, "w"): the file appears if the checkpoint's code runs."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return builtins.open, (self.target, "w")


def crafted_checkpoint(folder):
    """(checkpoint, the file its unpickling would create): fairseq's keys, one payload."""
    path, target = folder / "crafted.pt", folder / "created_by_the_checkpoint"
    torch.save({"model": {}, "args": None, "cfg": None, "payload": _CreatesFile(target)}, path)
    return path, target


def test_python_api_refuses_a_crafted_checkpoint(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils
    path, target = crafted_checkpoint(tmp_path)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(CheckpointRefused) as err:
        checkpoint_utils.load_model_ensemble([str(path)])
    assert not target.exists()
    assert "io.open" in str(err.value) and f"{TRUST_ENV}=1" in str(err.value)
    assert str(path) in str(err.value)
    # The opt-in loads it in full: the payload is live (and the file is no model).
    monkeypatch.setenv(TRUST_ENV, "1")
    with open(path, "rb") as f:  # fairseq's own loading would then fail: no model in it
        checkpoint_utils.torch.load(f, map_location="cpu")["payload"].close()
    assert target.exists()


CLIS = {
    "fairseq-generate": lambda c, p: ("fairseq-generate", [c / "mt-bin", "--path", p, *COMMON], None),
    "fairseq-interactive": lambda c, p: ("fairseq-interactive", [c / "mt-bin", "--path", p, *COMMON,
                                                                 "--source-lang", "src", "--target-lang", "tgt"], "a b c\n"),
    "fairseq-eval-lm": lambda c, p: ("fairseq-eval-lm", [c / "lm-bin", "--path", p, *COMMON, "--tokens-per-sample", "32"], None),
    "fairseq-train --restore-file": lambda c, p: (
        "fairseq-train", [c / "lm-bin", *COMMON, *TRAIN, *LM, "--arch", "fwp_lm_tiny", "--max-update", "1",
                          "--restore-file", p, "--save-dir", p.parent / "save"], None),
}


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_cli_refuses_a_crafted_checkpoint(corpus, tmp_path, cli):
    path, target = crafted_checkpoint(tmp_path)
    tool, args, stdin = CLIS[cli](corpus, path)
    out = run(tool, *args, stdin=stdin, fails=True, env={TRUST_ENV: ""})
    assert "refused to load the checkpoint" in out and "io.open" in out, out[-3000:]
    assert f"{TRUST_ENV}=1" in out
    assert not target.exists()


def _same(a, b):
    """Equal nested checkpoint contents (tensors compared exactly)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_loads_as_in_full(path, monkeypatch):
    """The safe load gives exactly what a full load gives."""
    from fairseq import checkpoint_utils
    monkeypatch.delenv(TRUST_ENV, raising=False)
    safe = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    monkeypatch.setenv(TRUST_ENV, "1")
    full = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    monkeypatch.delenv(TRUST_ENV)
    assert _same(safe, full)


def test_plain_fairseq_transformer_loads_and_generates(corpus, tmp_path, monkeypatch):
    save = tmp_path / "transformer"
    run("fairseq-train", corpus / "mt-bin", *COMMON, *TRAIN, *TINY_TRANSFORMER, "--max-tokens", "400",
        "--max-update", "2", "--save-dir", save)
    path = save / "checkpoint_last.pt"
    with torch.serialization.safe_globals(checkpoint_loading.allowed_globals()):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    assert_loads_as_in_full(path, monkeypatch)
    out = run("fairseq-generate", corpus / "mt-bin", "--path", path, *COMMON, "--beam", "2",
              "--batch-size", "16", "--gen-subset", "test", "--required-batch-size-multiple", "1")
    assert out.count("\nH-") == 12, out[-3000:]


def test_omegaconf_config_loads(tmp_path, monkeypatch):
    """A checkpoint whose cfg is an omegaconf DictConfig (as fairseq once stored it) loads."""
    from omegaconf import OmegaConf
    path = tmp_path / "omegaconf.pt"
    cfg = OmegaConf.create({"model": {"_name": "x", "dim": 16, "drop": 0.1, "on": True, "name": "a",
                                      "layers": [1, 2], "none": None}})
    torch.save({"cfg": cfg, "model": {"w": torch.ones(2)}}, path)
    with torch.serialization.safe_globals(checkpoint_loading.allowed_globals()):
        state = torch.load(path, weights_only=True)
    assert OmegaConf.to_container(state["cfg"]) == OmegaConf.to_container(cfg)


FWP_ARCHS = {
    "fwp_transformer_tiny": lambda c: [c / "mt-bin", "--arch", "fwp_transformer_tiny", "--fwp-kernel", "dpfp",
                                       "--fwp-update", "delta", "--max-tokens", "400"],
    "fwp_lm_tiny": lambda c: [c / "lm-bin", *LM, "--arch", "fwp_lm_tiny", "--fwp-kernel", "performer",
                              "--fwp-performer-features", "8"],
    "fwp_retrieval": lambda c: ["--task", "associative_retrieval", "--arch", "fwp_retrieval", "--criterion",
                                "half_mse", "--num-keys", "8", "--setting", "1", "--train-size", "64",
                                "--valid-size", "32", "--batch-size", "32"],
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(FWP_ARCHS))
def test_fwp_checkpoints_load_as_in_full(corpus, tmp_path, monkeypatch, arch):
    """Every fwp model class (fwp_transformer, fwp_lm, fwp_retrieval); fwp_transformer_tiny and
    fwp_lm_tiny also load through the CLIs in test_cli.py and test_checkpoints.py."""
    run("fairseq-train", *FWP_ARCHS[arch](corpus), *COMMON, *TRAIN, "--max-update", "2", "--save-dir", tmp_path)
    assert_loads_as_in_full(tmp_path / "checkpoint_last.pt", monkeypatch)
