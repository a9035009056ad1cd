"""The associative-retrieval task, model and criterion (paper section 6.1), and the demo driver."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

fairseq = pytest.importorskip("fairseq")

import fwp_fairseq  # noqa: E402

fwp_fairseq.register()

from fwp_fairseq.criterions.half_mse import HalfMSECriterion  # noqa: E402
from fwp_fairseq.models.retrieval_model import RetrievalModel, RetrievalModelConfig  # noqa: E402
from fwp_fairseq.tasks.associative_retrieval import (  # noqa: E402
    AssociativeRetrievalConfig, AssociativeRetrievalDataset, AssociativeRetrievalTask, make_sequence)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SMALL_ENV = dict(os.environ, OMP_NUM_THREADS="1", LOGLEVEL="WARNING")


def _dataset(setting, num_queries=0, split_id=0, fresh=True, seed=3, S=12):
    return AssociativeRetrievalDataset(size=16, num_keys=S, setting=setting, key_vocab_size=S,
                                       num_queries=num_queries, seed=seed, split_id=split_id,
                                       fresh_each_epoch=fresh)


def _latest_write(keys, values, query):
    hits = [t for t, k in enumerate(keys) if k == query]
    return values[hits[-1]]


@pytest.mark.parametrize("setting", [1, 2])
def test_data_is_deterministic_and_answers_are_the_latest_write(setting):
    S = 12
    a, b = _dataset(setting, S=S), _dataset(setting, S=S)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for name in ("keys", "values", "queries", "targets"):
            np.testing.assert_array_equal(x[name], y[name])
        assert len(x["keys"]) == len(x["values"]) == S * setting
        assert len(x["queries"]) == S * setting  # 0 queries every position
        for q, t in zip(x["queries"], x["targets"]):
            assert t == _latest_write(list(x["keys"]), list(x["values"]), q)
        if setting == 1:
            assert sorted(x["keys"]) == list(range(S))  # S distinct keys
            assert sorted(x["values"]) == list(range(S))
    assert max(x["values"].max() for x in (a[i] for i in range(len(a)))) < S


def test_setting2_keys_repeat_and_overwrites_matter():
    ds = _dataset(2, S=12)
    repeats = overwritten = 0
    for i in range(len(ds)):
        x = ds[i]
        keys, values = list(x["keys"]), list(x["values"])
        repeats += len(keys) - len(set(keys))
        for q, t in zip(x["queries"], x["targets"]):
            first = values[keys.index(q)]
            overwritten += first != t
    assert repeats > 0 and overwritten > 0


def test_training_data_is_fresh_each_epoch_validation_is_fixed():
    train = _dataset(1)
    first = train[0]["keys"].copy()
    train.set_epoch(2)
    assert not np.array_equal(first, train[0]["keys"])
    valid = _dataset(1, split_id=1, fresh=False)
    first = valid[0]["keys"].copy()
    valid.set_epoch(2)
    np.testing.assert_array_equal(first, valid[0]["keys"])
    assert not np.array_equal(_dataset(1, seed=4)[0]["keys"], _dataset(1, seed=3)[0]["keys"])


def test_make_sequence_query_count():
    rng = np.random.default_rng(0)
    keys, values, queries, targets = make_sequence(rng, 10, 1, 10, 3)
    assert queries.shape == targets.shape == (3,)
    assert len(set(queries.tolist())) == 3  # distinct positions, so distinct keys in setting 1


def _task(S=10, setting=1, queries=2):
    cfg = AssociativeRetrievalConfig(num_keys=S, setting=setting, queries_per_seq=queries, seed=1)
    return AssociativeRetrievalTask(cfg)


def _batch(task, split="train", n=4):
    task.load_dataset(split)
    ds = task.dataset(split)
    return ds.collater([ds[i] for i in range(n)])


MODELS = [("softmax", "sum", {}), ("linear", "sum", {}), ("linear", "delta", {}),
          ("dpfp", "sum", {"fwp_dpfp_nu": 2}), ("dpfp", "delta", {"fwp_dpfp_nu": 3}),
          ("performer", "sum", {"fwp_performer_features": 16}),
          ("performer", "delta", {"fwp_performer_features": 16})]


@pytest.mark.parametrize("kernel,update,extra", MODELS)
def test_model_forward_shapes_and_gradients(kernel, update, extra):
    task = _task(S=10, setting=2, queries=3)
    sample = _batch(task)
    model = RetrievalModel.build_model(RetrievalModelConfig(fwp_kernel=kernel, fwp_update=update, **extra), task)
    out = model(**sample["net_input"])
    assert out.shape == (4, 3, 10)
    assert torch.isfinite(out).all()
    loss, sample_size, log = HalfMSECriterion(task)(model, sample)
    loss.backward()
    assert sample_size == 12 and log["nsentences"] == 4
    assert model.key_proj.weight.grad is not None and torch.isfinite(model.key_proj.weight.grad).all()
    if update == "delta" and kernel != "softmax":
        assert model.beta_proj.bias is None and model.beta_proj.weight.grad is not None


@pytest.mark.parametrize("kernel", ["linear", "dpfp", "performer"])
def test_sum_rule_fast_weight_and_attention_forms_agree(kernel):
    task = _task(S=10, setting=2, queries=5)
    sample = _batch(task)
    torch.manual_seed(0)
    model = RetrievalModel.build_model(RetrievalModelConfig(fwp_kernel=kernel, fwp_performer_features=16), task)
    model.double().eval()  # fp64: the two orders of the same sum agree to round-off, ~1e-15
    outs = []
    for form in ("fast_weight", "attention"):
        model.sum_form = form
        outs.append(model(**sample["net_input"]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)


def test_gathered_projection_equals_linear_on_concatenation():
    task = _task(S=10)
    sample = _batch(task)
    model = RetrievalModel.build_model(RetrievalModelConfig(fwp_kernel="linear", fwp_update="delta"), task)
    model.double()  # fp64: a gather-and-add and a product sum in different orders
    keys, values = sample["net_input"]["keys"], sample["net_input"]["values"]
    x = torch.cat([torch.nn.functional.one_hot(values, 10).double(), model.embed_keys(keys)], -1)
    for lin in (model.key_proj, model.beta_proj):
        torch.testing.assert_close(model._gather_linear(lin, model.embed_keys, values, keys, 10), lin(x),
                                   rtol=1e-10, atol=1e-10)


def test_delta_rule_model_matches_a_step_by_step_memory():
    """The model's delta-rule read equals W_t = W_{t-1} + beta_t (v_t - W_{t-1} phi_t) phi_t^T."""
    task = _task(S=6, setting=2, queries=4)
    sample = _batch(task, n=2)
    model = RetrievalModel.build_model(RetrievalModelConfig(fwp_kernel="dpfp", fwp_update="delta"), task).double()
    inp = sample["net_input"]
    out = model(**inp)
    keys, values, queries = inp["keys"], inp["values"], inp["queries"]
    k = model._gather_linear(model.key_proj, model.embed_keys, values, keys, 6)
    beta = torch.sigmoid(model._gather_linear(model.beta_proj, model.embed_keys, values, keys, 6))[..., 0]
    q = model.query_proj(model.embed_keys(queries))
    pk, pq = model._phi(k), model._phi(q)
    v = torch.nn.functional.one_hot(values, 6).double()  # fp64 throughout: an exactness check
    for b in range(2):
        W = torch.zeros(6, pk.shape[-1], dtype=torch.float64)
        for t in range(keys.shape[1]):
            W = W + beta[b, t] * torch.outer(v[b, t] - W @ pk[b, t], pk[b, t])
        torch.testing.assert_close(out[b], pq[b] @ W.T, rtol=1e-10, atol=1e-10)


def test_half_mse_is_half_for_zero_output():
    class Zero(torch.nn.Module):
        def forward(self, keys, values, queries):
            return torch.zeros(*queries.shape, 10)

    task = _task(S=10)
    sample = _batch(task)
    loss, sample_size, log = HalfMSECriterion(task)(Zero(), sample)
    assert loss.item() / sample_size == pytest.approx(0.5)
    assert log["loss"] / log["sample_size"] == pytest.approx(0.5)


def test_performer_redraws_in_training_only():
    task = _task(S=10)
    model = RetrievalModel.build_model(RetrievalModelConfig(fwp_kernel="performer", fwp_performer_features=8), task)
    before = model.feature_map.projection.clone()
    model.train()
    model.set_num_updates(1)
    drawn = model.feature_map.projection.clone()
    assert not torch.equal(before, drawn)
    model.eval()
    model.set_num_updates(2)
    assert torch.equal(drawn, model.feature_map.projection)


def test_fairseq_train_cli_runs_and_stops_at_the_target(tmp_path):
    cmd = [os.path.join(BIN, "fairseq-train"), "--user-dir", os.path.join(REPO, "fwp_fairseq"),
           "--task", "associative_retrieval", "--arch", "fwp_retrieval", "--criterion", "half_mse",
           "--num-keys", "8", "--setting", "1", "--fwp-kernel", "dpfp", "--fwp-dpfp-nu", "1",
           "--queries-per-seq", "0", "--train-size", "320", "--valid-size", "32",
           "--optimizer", "adam", "--lr", "1e-2", "--batch-size", "32", "--max-update", "60",
           "--stop-loss", "0.5", "--best-checkpoint-metric", "stop_metric", "--patience", "1",
           "--no-save", "--num-workers", "0", "--log-format", "json", "--seed", "1",
           "--save-dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, env=dict(SMALL_ENV, LOGLEVEL="INFO"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    valid = [json.loads(line[line.index("{"):]) for line in res.stdout.splitlines() if '"valid_loss"' in line]
    assert valid, res.stdout[-3000:]
    # A loss below 0.5 at the first validation is known from the second one, which stops the run.
    assert float(valid[-1]["valid_loss"]) < 0.5
    assert int(valid[-1]["valid_num_updates"]) == 20


def test_demo_quick_writes_table_csv_json_png(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "associative_retrieval", "run_demo.py"),
                          "--quick", "--jobs", "1", "--out-dir", str(out)],
                         cwd=REPO, env=SMALL_ENV, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    for name in ("results.csv", "results.json", "results.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert rows and all(0.0 <= float(r["eval_loss"]) < 1.0 for r in rows)
    data = json.load(open(out / "results.json"))
    assert len(data["runs"]) == len(rows)
    assert "results.csv" in res.stdout
