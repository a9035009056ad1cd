"""Distributed data parallel on the CPU: torchrun, 2 workers, gloo. Training runs to the end,
and after N updates both workers hold identical parameters and identical FAVOR+ draws
(tests/dist_dump_train.py saves each worker's state).

On the CPU fairseq's pytorch_ddp passes device_ids=[0], which torch's DDP refuses for CPU
modules, so these runs use --ddp-backend legacy_ddp (fairseq's own gradient all-reduce), which
tolerates unused parameters. What pytorch_ddp (GPU) needs, that every parameter gets a gradient
(find_unused_parameters is off by default), is checked in-process below."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fairseq")
from helpers import COMMON, TRAIN, build, random_tokens, run  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
UPDATES = 3


def torchrun(data, dump, arch, kernel, update):
    task = ["--task", "language_modeling", "--tokens-per-sample", "32", "--sample-break-mode", "none"] \
        if "lm" in arch else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_dump_train.py"), data, *COMMON, *TRAIN, *task, "--arch", arch,
           "--fwp-kernel", kernel, "--fwp-update", update, "--fwp-performer-features", "8",
           "--max-tokens", "128", "--max-update", str(UPDATES), "--no-save", "--save-dir", dump,
           "--distributed-backend", "gloo", "--distributed-world-size", "2",
           "--ddp-backend", "legacy_ddp"]  # pytorch_ddp passes device_ids=[0], which CPU DDP refuses
    env = dict(os.environ, OMP_NUM_THREADS="1", FWP_DUMP_DIR=str(dump))
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    torchrun.output = out
    return [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]


def check_identical(states):
    a, b = states
    assert int(a["_num_updates"]) == int(b["_num_updates"]) == UPDATES
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the workers"
    draws = [k for k in a if k.endswith("feature_map.projection")]
    return draws


def _run(root, tmp_path, arch, kernel, update):
    data = root / ("lm-bin" if "lm" in arch else "mt-bin")
    draws = check_identical(torchrun(data, tmp_path, arch, kernel, update))
    assert bool(draws) == (kernel == "performer")


def test_lm_performer_delta_two_workers(tiny_lm_corpus, tmp_path):
    """FAVOR+ (redrawn every update, identical on both workers) with the delta rule (beta_proj)."""
    _run(tiny_lm_corpus, tmp_path, "fwp_lm_tiny", "performer", "delta")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fwp_lm_tiny", "fwp_transformer_tiny"])
@pytest.mark.parametrize("kernel", ["linear", "performer", "dpfp"])
@pytest.mark.parametrize("update", ["sum", "delta"])
def test_every_arch_kernel_and_rule_two_workers(corpus, tmp_path, arch, kernel, update):
    _run(corpus, tmp_path, arch, kernel, update)


FAST = {("fwp_transformer_tiny", "performer", "delta"), ("fwp_lm_tiny", "dpfp", "sum")}


@pytest.mark.parametrize("arch, kernel, update", [
    pytest.param(a, k, u, marks=() if (a, k, u) in FAST else pytest.mark.slow)
    for a in ("fwp_lm_tiny", "fwp_transformer_tiny") for k in ("linear", "performer", "dpfp")
    for u in ("sum", "delta")])
def test_every_parameter_gets_a_gradient(arch, kernel, update):
    """DDP without find_unused_parameters fails on a parameter that takes no part in the loss
    (e.g. a beta_proj built for attention that runs the sum rule)."""
    model, d = build(arch, ["--fwp-kernel", kernel, "--fwp-update", update, "--fwp-performer-features", "8"])
    model.train()
    gen = torch.Generator().manual_seed(0)
    tokens = random_tokens(d, 2, 7, gen)
    if "lm" in arch:
        out = model(tokens)[0]
    else:
        out = model(random_tokens(d, 2, 5, gen), torch.tensor([5, 5]), tokens)[0]
    out.float().logsumexp(-1).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


@pytest.mark.slow
def test_two_workers_resume_through_rank_0(tiny_lm_corpus, tmp_path):
    """Rank 0 loads checkpoint_last.pt (weights-only, compat/checkpoint_loading.py) and sends it
    to the other worker, which unpickles the job's own bytes in full (compat/distributed_objects.py):
    both go on from the checkpoint's update and end identical."""
    data = tiny_lm_corpus / "lm-bin"
    run("fairseq-train", data, *COMMON, *TRAIN, "--task", "language_modeling", "--tokens-per-sample", "32",
        "--sample-break-mode", "none", "--arch", "fwp_lm_tiny", "--fwp-kernel", "performer",
        "--fwp-update", "delta", "--fwp-performer-features", "8", "--max-tokens", "128",
        "--max-update", str(UPDATES - 1), "--save-dir", tmp_path)
    check_identical(torchrun(data, tmp_path, "fwp_lm_tiny", "performer", "delta"))
    assert re.search(rf"[Ll]oaded checkpoint .* \(epoch 1 @ {UPDATES - 1} updates\)", torchrun.output)
