"""Fast weights carried across segments (issue 7): the stream layout of fwp_stream_lm, the carried
(S, z) of FastWeightAttention, fwp_lm's reset rules, evaluation independent of --tokens-per-sample,
constant-size incremental state; slow: the CLIs (train + resume, eval-lm, generate, interactive)
and distributed training with torchrun."""
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fairseq")
from fairseq import options, tasks  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.data.indexed_dataset import make_builder  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq_cli.eval_lm import eval_lm  # noqa: E402

import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.data import TokenStream  # noqa: E402
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from helpers import check_decoding_buffer  # noqa: E402

PKG = os.path.dirname(os.path.abspath(fwp_fairseq.__file__))
BIN = os.path.dirname(sys.executable)
WORDS = [chr(ord("a") + i) for i in range(12)]


# -- data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A binarised word corpus (mmap format), written in-process: fast, no fairseq-preprocess."""
    root = tmp_path_factory.mktemp("fwp_stream")
    d = Dictionary()
    for w in WORDS:
        d.add_symbol(w)
    d.save(str(root / "dict.txt"))
    rng = random.Random(0)
    for split, n in (("train", 120), ("valid", 12), ("test", 15)):
        builder = make_builder(str(root / f"{split}.bin"), impl="mmap", vocab_size=len(d))
        with open(root / f"{split}.txt", "w") as f:
            for _ in range(n):
                line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
                f.write(line + "\n")
                builder.add_item(d.encode_line(line, add_if_not_exist=False).long())
        builder.finalize(str(root / f"{split}.idx"))
    return root


def test_streams_cover_every_token_once_and_shards_are_disjoint():
    eos, pad = 2, 1
    lines = [torch.arange(10 * i + 4, 10 * i + 4 + n) for i, n in enumerate([3, 7, 1, 5, 9, 2])]
    stream = TokenStream(lines, pad, eos)
    flat = torch.cat(lines)
    seen, rows = [], {}
    lengths = set()
    for shard in range(2):
        seg = stream.segments(streams_per_shard=2, segment_len=3, num_shards=2, shard_id=shard)
        lengths.add(len(seg))
        for i in range(len(seg)):
            b = seg.collater([seg[i]])
            assert b["net_input"]["stream_segment"] == i
            for r, sid in enumerate(b["id"].tolist()):
                rows.setdefault(sid, ([], []))
                rows[sid][0].append(b["net_input"]["src_tokens"][r])
                rows[sid][1].append(b["target"][r])
    assert len(lengths) == 1  # workers step together
    assert sorted(rows) == [0, 1, 2, 3]  # disjoint shards, all streams
    for sid in sorted(rows):
        src, tgt = torch.cat(rows[sid][0]), torch.cat(rows[sid][1])
        real = tgt.ne(pad)
        seen.append(tgt[real])
        # input = target shifted right by one, </s> before the very first token
        prev = torch.cat([torch.tensor([eos]), flat])[sid * len(tgt):sid * len(tgt) + len(tgt)]
        assert torch.equal(src[real], prev[:len(src)][real])
    assert torch.equal(torch.cat(seen), flat)  # every token a target exactly once, in order


def test_too_many_streams_is_an_error():
    with pytest.raises(ValueError, match="cannot fill"):
        TokenStream([torch.arange(4, 9)], 1, 2).segments(4, 2, num_shards=2)


# -- the layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("update,norm", [("delta", False), ("delta", True), ("sum", True)])
def test_layer_carry_equals_one_long_segment(update, norm):
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="dpfp", update=update,
                              attn_normalize=norm).eval()
    x = torch.randn(23, 3, 16, dtype=torch.float64)
    att.double()
    whole, _ = att(x, x, x)
    att.set_carry_state(True)
    parts = [att(c, c, c)[0] for c in x.split(5)]  # segments of 5, last one of 3
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-9, atol=1e-9)
    att.reset_carried_state()
    torch.testing.assert_close(att(x[:5], x[:5], x[:5])[0], whole[:5], rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="streams"):
        att(x[5:7, :2], x[5:7, :2], x[5:7, :2])


def test_layer_carry_is_detached_and_per_mode():
    torch.manual_seed(0)
    att = FastWeightAttention(8, 2, self_attention=True, causal=True, update="delta")
    att.set_carry_state(True)
    x = torch.randn(4, 2, 8, requires_grad=True)
    att(x, x, x)[0].sum().backward()
    state, z = att._carried["train"]
    assert not state.requires_grad and z is None
    att.eval()
    att(x, x, x)
    assert set(att._carried) == {"train", "eval"} and att._carried["train"][0] is state
    att.reset_carried_state("eval")
    assert set(att._carried) == {"train"}
    with pytest.raises(ValueError, match="causal"):
        FastWeightAttention(8, 2, self_attention=True).set_carry_state(True)


# -- the model and task in-process ------------------------------------------------------------

def setup(data_dir, *extra, carry=True, positions=False, T=16):
    args = ["--task", "fwp_stream_lm", "--arch", "fwp_lm_tiny", "--user-dir", PKG, "--dropout", "0",
            "--tokens-per-sample", str(T), "--batch-size", "3", *extra]
    args += ["--fwp-carry-state"] if carry else []
    args += [] if positions else ["--no-token-positional-embeddings"]
    parsed = options.parse_args_and_arch(options.get_training_parser(), [str(data_dir), *args])
    cfg = convert_namespace_to_omegaconf(parsed)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return task, task.build_model(cfg.model)


def perplexity(task, model, split, T):
    """eval_lm's perplexity with the model in fp64 (converted in place): carried segments, one
    segment and the attention order then agree to ~1e-15 in the logits. What stays fp32 is
    fairseq's (log_softmax casts, eval_lm sums the scores in fp32, grouped by segment): relative
    ~ segments x eps32 < 1e-5 on this corpus, the bound of the tightest comparison across
    segment lengths below (the same segmentation sums in the same order: equal)."""
    task.args.tokens_per_sample = T
    task.load_dataset(split)
    itr = task.eval_lm_dataloader(task.dataset(split), num_workers=0)
    return float(eval_lm([model.double().eval()], task.source_dictionary, itr)["perplexity"])


@pytest.mark.parametrize("fwp", [["--fwp-kernel", "linear", "--fwp-update", "delta"],
                                 ["--fwp-kernel", "linear", "--fwp-update", "delta", "--fwp-l2-normalize"],
                                 ["--fwp-kernel", "dpfp", "--fwp-update", "sum"],
                                 # Gated DeltaNet (models/presets.py): the short convolution's inputs carry too
                                 ["--fwp-kernel", "identity", "--fwp-l2-normalize", "--fwp-update", "delta",
                                  "--fwp-short-conv", "4", "--fwp-gate", "scalar", "--fwp-beta-range", "double",
                                  "--fwp-output-norm", "rms-gated"]])
def test_eval_does_not_depend_on_segment_length(data_dir, fwp):
    task, model = setup(data_dir, *fwp)
    whole = perplexity(task, model, "test", 100_000)
    for T in (16, 7):
        assert perplexity(task, model, "test", T) == pytest.approx(whole, rel=1e-4)
    # without the carry, segments are independent and the result does depend on T
    task, model = setup(data_dir, *fwp, carry=False)
    assert perplexity(task, model, "test", 100_000) == pytest.approx(whole, rel=1e-6)
    assert perplexity(task, model, "test", 16) != pytest.approx(whole, rel=1e-3)


def test_eval_reset_segments_equals_independent_longer_segments(data_dir):
    """--fwp-eval-reset-segments 3 with segments of 8: the state restarts every 24 tokens, the
    same scores as independent segments of 24 without carry; training is not affected."""
    fwp = ["--fwp-kernel", "dpfp", "--fwp-update", "delta", "--fwp-l2-normalize"]
    task, model = setup(data_dir, *fwp, "--fwp-eval-reset-segments", "3")
    got = perplexity(task, model, "test", 8)
    task, model = setup(data_dir, *fwp, carry=False)
    assert got == pytest.approx(perplexity(task, model, "test", 24), rel=1e-5)
    task, model = setup(data_dir, *fwp)
    assert got != pytest.approx(perplexity(task, model, "test", 8), rel=1e-3)  # all context: differs
    with pytest.raises(ValueError, match="need --fwp-carry-state"):
        setup(data_dir, "--fwp-eval-reset-segments", "4", carry=False)
    with pytest.raises(ValueError, match="--fwp-eval-reset-segments: must be >= 0"):
        model.set_carry_reset(0, -1)


def test_training_state_is_reset_per_epoch_and_kept_across_validation(data_dir):
    task, model = setup(data_dir, "--fwp-kernel", "linear", "--fwp-attn-normalize")
    task.load_dataset("train")
    task.load_dataset("valid")
    train = list(task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr(shuffle=True))
    valid = next(iter(task.get_batch_iterator(task.dataset("valid")).next_epoch_itr(shuffle=False)))
    assert train[0]["target"].size(0) == 3 and valid["target"].size(0) == 1  # --eval-streams 1
    assert [b["net_input"]["stream_segment"] for b in train] == list(range(len(train)))  # no shuffling
    model.train()
    first = model(**train[0]["net_input"])[0]
    model(**train[1]["net_input"])[0].sum().backward()  # backprop within the segment only
    layer = model.fast_self_attention()[0]
    carried = layer._carried["train"]
    model.eval()
    model(**valid["net_input"])  # validation: its own streams, from zero
    model.train()
    assert layer._carried["train"] is carried
    torch.testing.assert_close(model(**train[0]["net_input"])[0], first)  # next epoch: from zero
    model(**train[2]["net_input"])  # a gap (resumed mid-epoch): restarts from zero too
    with pytest.raises(ValueError, match="fwp_stream_lm"):
        model(train[0]["net_input"]["src_tokens"])


def test_carry_needs_no_positions_and_fast_weights(data_dir):
    with pytest.raises(ValueError, match="--no-token-positional-embeddings"):
        setup(data_dir, positions=True)
    with pytest.raises(ValueError, match="softmax"):
        setup(data_dir, "--fwp-kernel", "softmax")
    task, _ = setup(data_dir, carry=False)
    task.load_dataset("test")
    with pytest.raises(ValueError, match="--context-window"):
        task.eval_lm_dataloader(task.dataset("test"), context_window=4)


@pytest.mark.parametrize("norm", [False, True])
def test_incremental_state_is_bounded(data_dir, norm):
    _, model = setup(data_dir, "--fwp-attn-normalize" if norm else "--fwp-no-attn-normalize",
                     carry=False, positions=True)
    model.double().eval()  # fp64: incremental vs full is an exactness check
    tokens = torch.randint(4, 16, (2, 30))
    state, shapes, outs = {}, [], []
    with torch.no_grad():
        for t in range(tokens.size(1)):
            outs.append(model.decoder(tokens[:, :t + 1], incremental_state=state)[0])
            # every layer: at most numel(S) + numel(z) stored (written keys/values, then S)
            shapes.append([check_decoding_buffer(buf) for buf in state.values()
                           if any(k.startswith("fw_") for k in buf)])
        full = model.decoder(tokens)[0]
    assert shapes[0] and not any(folded for folded, _ in shapes[0])
    assert all(folded for folded, _ in shapes[-1]) and shapes[-1] == shapes[-2]  # constant once folded
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


# -- the CLIs ---------------------------------------------------------------------------------

def run(tool, *args, stdin=None, cmd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run(cmd or [os.path.join(BIN, tool), *map(str, args)], input=stdin, capture_output=True,
                       text=True, env=env, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{tool} failed:\n{out[-4000:]}"
    return out


TRAIN = ["--user-dir", PKG, "--cpu", "--seed", "1", "--task", "fwp_stream_lm", "--fwp-carry-state",
         "--arch", "fwp_lm_tiny", "--no-token-positional-embeddings", "--tokens-per-sample", "16",
         "--batch-size", "3", "--optimizer", "adam", "--lr", "1e-3", "--no-progress-bar", "--log-format",
         "simple", "--log-interval", "1", "--num-workers", "0", "--no-epoch-checkpoints"]


@pytest.fixture(scope="module")
def checkpoint(data_dir):
    save = data_dir / "ckpt"
    out = run("fairseq-train", data_dir, *TRAIN, "--max-update", "4", "--save-dir", save,
              "--save-interval-updates", "4")
    assert "worker 0 of 1: streams 0..2 of 3" in out
    # Resume mid-epoch: the state is not in the checkpoint and restarts from zero.
    out = run("fairseq-train", data_dir, *TRAIN, "--max-update", "6", "--save-dir", save)
    assert re.search(r"[Ll]oaded checkpoint .*4 updates", out), out[-3000:]
    assert "carried fast weights (train) restart from zero at segment 4" in out
    return save / "checkpoint_last.pt"


def eval_cli(data_dir, ckpt, T, *extra):
    out = run("fairseq-eval-lm", data_dir, "--user-dir", PKG, "--cpu", "--path", ckpt, "--gen-subset", "test",
              "--tokens-per-sample", T, *extra)
    m = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", out)
    assert m, out[-3000:]
    return float(m.group(1))


@pytest.mark.slow
def test_cli_eval_lm_carry_is_independent_of_segment_length(data_dir, checkpoint):
    stream = ["--task", "fwp_stream_lm", "--fwp-carry-state"]
    short, whole = eval_cli(data_dir, checkpoint, 16, *stream), eval_cli(data_dir, checkpoint, 100000, *stream)
    assert short == pytest.approx(whole, abs=1e-4)  # printed with 4 decimals
    window = eval_cli(data_dir, checkpoint, 16, "--task", "language_modeling", "--context-window", "12")
    assert 0 < window < 10 and window != short


@pytest.mark.slow
@pytest.mark.parametrize("search", [["--beam", "4"], ["--sampling", "--beam", "1"]])
def test_cli_generate_and_interactive(data_dir, checkpoint, search):
    """A checkpoint trained with carried state generates with fairseq's language_modeling task."""
    common = [data_dir, "--user-dir", PKG, "--cpu", "--seed", "1", "--path", checkpoint,
              "--task", "language_modeling", "--max-len-b", "12", *search]
    # One line per sample, the line as the prefix. (With --sample-break-mode none, prefixes hold
    # </s> and fairseq 0.12's beam search trips its own prefix assertions, whatever the model.)
    out = run("fairseq-generate", *common, "--gen-subset", "test", "--sample-break-mode", "eos",
              "--batch-size", "4", "--required-batch-size-multiple", "1")
    assert len(re.findall(r"^H-\d+", out, re.M)) == 15
    out = run("fairseq-interactive", *common, stdin="a b c\nd e\n")
    assert len(re.findall(r"^H-\d+", out, re.M)) == 2


@pytest.mark.slow
def test_distributed_training_two_workers(data_dir):
    """Two gloo workers, each with its own streams (0..2 and 3..5 of 6), for a few updates."""
    save = data_dir / "ckpt-ddp"
    # legacy_ddp: fairseq's pytorch_ddp wrapper passes device_ids to DDP, which CPU modules refuse.
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", "29617",
           os.path.join(BIN, "fairseq-train"), str(data_dir), *TRAIN, "--max-update", "3", "--save-dir",
           str(save), "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    out = run("torchrun", cmd=cmd)
    assert "training on 2 devices" in out
    assert "worker 0 of 2: streams 0..2 of 6" in out  # worker 1: streams 3..5
    assert "worker 0 of 2: streams 0..0 of 2" in out  # validation: one stream per worker
    assert "bsz=6, num_updates=3" in out  # both workers' streams in every update
    assert (save / "checkpoint_last.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("reset", [0, 2])
def test_drift_script_matches_eval_lm(data_dir, checkpoint, reset):
    """experiments/carried_state/carry_state_drift.py: its whole-split loss is fairseq-eval-lm's
    (also with the state reset every 2 segments: --reset-segments / --fwp-eval-reset-segments);
    --json writes the same numbers per segment, and plot_drift.py draws them."""
    script = os.path.join(os.path.dirname(PKG), "experiments", "carried_state", "carry_state_drift.py")
    out = run("carry_state_drift.py", cmd=[sys.executable, script, str(checkpoint), "--data", str(data_dir),
                                           "--split", "test", "--tokens-per-sample", "16", "--bin-segments", "2",
                                           "--reset-segments", str(reset), "--fold", "4",
                                           "--json", str(data_dir / f"drift{reset}.json")])
    m = re.search(r"whole split: ([0-9.]+) bits", out)
    assert m and "|S| per layer" in out and "segments     0-    1:" in out, out[-3000:]
    assert "position     2-    3 of every 4 segments:" in out, out[-3000:]
    d = json.loads((data_dir / f"drift{reset}.json").read_text())  # --json: every segment's loss and |S|
    assert len(d["bits"]) == len(d["tokens"]) == len(d["state_norm"]) > 1 and d["reset_segments"] == reset
    assert all(len(n) == len(d["state_norm"][0]) > 0 for n in d["state_norm"])
    whole = sum(b * t for b, t in zip(d["bits"], d["tokens"])) / sum(d["tokens"])
    assert whole == pytest.approx(float(m.group(1)), abs=1e-4)
    plot = os.path.join(os.path.dirname(script), "plot_drift.py")
    run("plot_drift.py", cmd=[sys.executable, plot, str(data_dir / "drift.png"),
                              f"carried={data_dir / f'drift{reset}.json'}", "--bin-segments", "2"])
    assert (data_dir / "drift.png").stat().st_size > 0
    want = eval_cli(data_dir, checkpoint, 16, "--task", "fwp_stream_lm", "--fwp-carry-state",
                    "--fwp-eval-reset-segments", str(reset))
    assert float(m.group(1)) == pytest.approx(want, abs=1e-4)
    if reset:
        assert want != pytest.approx(eval_cli(data_dir, checkpoint, 16, "--task", "fwp_stream_lm",
                                              "--fwp-carry-state"), abs=1e-3)


def test_drift_script_fold_pools_segments_by_position_in_period():
    """carry_state_drift.py --fold N: segment k counts at position k mod N, grouped 0, 1, 2-3,
    4-7, ...; the token-weighted mean over the groups is the whole split's loss."""
    import math
    sys.path.insert(0, os.path.join(os.path.dirname(PKG), "experiments", "carried_state"))
    try:
        from carry_state_drift import fold_bins
    finally:
        sys.path.pop(0)
    ln2 = math.log(2)
    segs = {k: ((k % 5 + 1) * ln2 * (10 + k), 10 + k) for k in range(23)}  # bits of segment k: k % 5 + 1
    got = fold_bins(segs, 5)
    assert [(lo, hi) for lo, hi, _, _ in got] == [(0, 0), (1, 1), (2, 3), (4, 4)]
    assert got[0][2] == pytest.approx(1) and got[1][2] == pytest.approx(2) and got[3][2] == pytest.approx(5)
    want3 = sum(s for k, (s, c) in segs.items() if k % 5 in (2, 3)) / sum(c for k, (s, c) in segs.items()
                                                                             if k % 5 in (2, 3)) / ln2
    assert got[2][2] == pytest.approx(want3)
    assert sum(t for *_, t in got) == sum(c for _, c in segs.values())
    whole = sum(s for s, _ in segs.values()) / sum(c for _, c in segs.values()) / ln2
    assert sum(bits * t for _, _, bits, t in got) / sum(t for *_, t in got) == pytest.approx(whole)
    assert [(lo, hi) for lo, hi, _, _ in fold_bins(segs, 32)] == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31)]
    assert fold_bins(segs, 0) == []


@pytest.mark.slow
def test_drift_script_sliding_windows_match_eval_lm(data_dir):
    """carry_state_drift.py on a checkpoint trained without carried state: sliding windows, and
    its whole-split loss is fairseq-eval-lm --context-window's."""
    save = data_dir / "ckpt_windows"
    train = [a for a in TRAIN if a not in ("fwp_stream_lm", "--fwp-carry-state")]
    train[train.index("--task") + 1:train.index("--task") + 1] = ["language_modeling", "--sample-break-mode", "none"]
    run("fairseq-train", data_dir, *train, "--max-update", "3", "--save-dir", save)
    ckpt = save / "checkpoint_last.pt"
    script = os.path.join(os.path.dirname(PKG), "experiments", "carried_state", "carry_state_drift.py")
    out = run("carry_state_drift.py", cmd=[sys.executable, script, str(ckpt), "--data", str(data_dir),
                                           "--split", "test", "--tokens-per-sample", "16", "--context-window", "12",
                                           "--bin-segments", "2"])
    m = re.search(r"whole split: ([0-9.]+) bits", out)
    assert m and "sliding windows of 16 scoring the last 4" in out and "segments     0-    1:" in out, out[-3000:]
    want = eval_cli(data_dir, ckpt, 16, "--task", "language_modeling", "--context-window", "12")
    assert float(m.group(1)) == pytest.approx(want, abs=1e-4)

def test_staggered_resets_keep_every_age_in_each_batch(data_dir):
    """--fwp-carry-reset-segments N: row r restarts from zero at the training segments k with
    (k + r*N//B) % N == 0 (its output then equals a fresh model's on that segment), other rows
    continue; a new pass continues the streams instead of resetting them all."""
    N = 2
    task, model = setup(data_dir, "--fwp-kernel", "linear", "--fwp-update", "delta",
                        "--fwp-carry-reset-segments", str(N))
    _, fresh = setup(data_dir, "--fwp-kernel", "linear", "--fwp-update", "delta", carry=False)
    fresh.load_state_dict(model.state_dict())
    model.double(), fresh.double()  # fp64: a restarted row equals a fresh model's to round-off
    task.load_dataset("train")
    batches = list(task.get_batch_iterator(task.dataset("train")).next_epoch_itr(shuffle=False))
    model.train(), fresh.train()  # dropout 0: deterministic
    with torch.no_grad():
        for k, b in enumerate(batches + batches[:2]):  # into a second pass
            src = b["net_input"]["src_tokens"]
            got = model(**b["net_input"])[0]
            alone = fresh(src)[0]
            for r in range(src.size(0)):
                reset = (k + r * N // src.size(0)) % N == 0
                same = torch.allclose(got[r], alone[r], rtol=1e-10, atol=1e-10)
                assert same == (reset or k == 0), (k, r)  # k = 0: every stream starts empty
    with pytest.raises(ValueError, match="--fwp-carry-state"):
        setup(data_dir, "--fwp-carry-reset-segments", "4", carry=False)
    with pytest.raises(ValueError, match="reset-segments"):
        model.set_carry_reset(-1)


def test_reset_carried_rows_zeroes_only_those_streams():
    torch.manual_seed(0)
    att = FastWeightAttention(8, 2, self_attention=True, causal=True, update="sum", attn_normalize=True)
    att.set_carry_state(True)
    x = torch.randn(4, 3, 8)
    att(x, x, x)
    state, z = att._carried["train"]
    att.reset_carried_rows(torch.tensor([False, True, False]))
    s2, z2 = att._carried["train"]
    assert s2[1].abs().sum() == 0 and z2[1].abs().sum() == 0
    torch.testing.assert_close(s2[[0, 2]], state[[0, 2]])
    torch.testing.assert_close(z2[[0, 2]], z[[0, 2]])
