"""Synthetic associative retrieval (arXiv 2102.11174, section 6.1), generated
from a seed: no files, no download.

A sequence writes T (key, value) pairs; queries name keys; the answer is the value of the latest
write of the queried key, a one-hot vector in R^S.
  setting 1: T = S, the S keys are a permutation of S key tokens (each written once).
  setting 2: T = 2S, keys drawn with replacement from S key tokens (keys repeat; latest wins).
Values are value tokens 0..S-1 (without replacement in setting 1, with replacement in setting 2).

Sample i of split s in epoch e is a pure function of (seed, s, e, i): the training split draws
fresh sequences every epoch (an endless stream, one epoch = one validation interval), the
validation split is the same every time.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq.logging import metrics
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from fwp_fairseq.data.generated import GeneratedDataset


SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


def make_sequence(rng, num_keys, setting, key_vocab_size, num_queries):
    """One example: keys (T,), values (T,), queries (Q,), targets (Q,) as int64 numpy arrays.

    num_queries = 0 queries every position. Query positions are drawn without replacement, so
    the queried key is distributed as in the paper (a uniformly chosen position's key)."""
    S = num_keys
    if setting == 1:
        keys = rng.choice(key_vocab_size, size=S, replace=False)
        values = rng.permutation(S)
    else:
        keys = rng.integers(0, key_vocab_size, size=2 * S)
        values = rng.integers(0, S, size=2 * S)
    T = len(keys)
    positions = np.arange(T) if num_queries == 0 else rng.choice(T, size=num_queries, replace=False)
    queries = keys[positions]
    # The answer is the latest write of the queried key, whichever position was drawn.
    last_write = np.full(key_vocab_size, -1)
    np.maximum.at(last_write, keys, np.arange(T))
    targets = values[last_write[queries]]
    return keys.astype(np.int64), values.astype(np.int64), queries.astype(np.int64), targets.astype(np.int64)


class AssociativeRetrievalDataset(GeneratedDataset):
    def __init__(self, size, num_keys, setting, key_vocab_size, num_queries, seed, split_id, fresh_each_epoch):
        super().__init__(size, seed, split_id, fresh_each_epoch)
        self.num_keys = num_keys
        self.setting = setting
        self.key_vocab_size = key_vocab_size
        self.num_queries = num_queries
        self.seq_len = num_keys * (1 if setting == 1 else 2)
        self.queries_per_seq = self.seq_len if num_queries == 0 else num_queries

    def __getitem__(self, index):
        rng = self.rng(index)
        keys, values, queries, targets = make_sequence(
            rng, self.num_keys, self.setting, self.key_vocab_size, self.num_queries)
        return {"id": index, "keys": keys, "values": values, "queries": queries, "targets": targets}

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        stack = lambda name: torch.from_numpy(np.stack([s[name] for s in samples]))  # noqa: E731
        targets = stack("targets")
        return {
            "id": torch.tensor([s["id"] for s in samples]),
            "nsentences": len(samples),
            "ntokens": targets.numel(),  # one "token" per query: the loss is a mean over queries
            "net_input": {"keys": stack("keys"), "values": stack("values"), "queries": stack("queries")},
            "target": targets,
        }

    def num_tokens(self, index):
        return self.seq_len + self.queries_per_seq

    def size(self, index):
        return self.seq_len + self.queries_per_seq


@dataclass
class AssociativeRetrievalConfig(FairseqDataclass):
    num_keys: int = field(default=20, metadata={"help": "S: number of keys per sequence and size of the one-hot values"})
    setting: int = field(default=1, metadata={
        "help": "1: S distinct keys, sequence length S; 2: keys repeat, sequence length 2S, the latest write counts"})
    key_vocab_size: int = field(default=0, metadata={"help": "number of key tokens (0: S, as in the paper)"})
    train_size: int = field(default=3200, metadata={
        "help": "sequences per training epoch (fresh ones every epoch, so one epoch = one validation interval)"})
    valid_size: int = field(default=128, metadata={"help": "sequences in the fixed validation set"})
    queries_per_seq: int = field(default=1, metadata={
        "help": "queries per training sequence (1: the paper; 0: every position). More queries only "
                "lower the gradient noise: the loss is a mean over queries either way"})
    valid_queries_per_seq: int = field(default=0, metadata={"help": "queries per validation sequence (0: every position)"})
    stop_loss: float = field(default=0.001, metadata={
        "help": "with --best-checkpoint-metric stop_metric --patience 1: stop once the eval loss is below this"})
    stop_patience: int = field(default=0, metadata={
        "help": "with the same options: also stop after this many validations without progress (0: never)"})
    stop_min_improvement: float = field(default=0.0, metadata={
        "help": "progress, for --stop-patience: the eval loss falls below (1 - this) x its value at the last progress"})
    seed: int = II("common.seed")


@register_task("associative_retrieval", dataclass=AssociativeRetrievalConfig)
class AssociativeRetrievalTask(FairseqTask):
    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.setting not in (1, 2):
            raise ValueError(f"--setting: expected 1 or 2, got {cfg.setting}")
        if cfg.num_keys < 1:
            raise ValueError(f"--num-keys: expected S >= 1, got {cfg.num_keys}")
        self.key_vocab_size = cfg.key_vocab_size or cfg.num_keys
        if cfg.setting == 1 and self.key_vocab_size < cfg.num_keys:
            raise ValueError(f"--key-vocab-size {self.key_vocab_size} < --num-keys {cfg.num_keys}: "
                             "setting 1 needs S distinct keys")
        seq_len = cfg.num_keys * cfg.setting
        for name in ("queries_per_seq", "valid_queries_per_seq"):
            if not 0 <= getattr(cfg, name) <= seq_len:
                raise ValueError(f"--{name.replace('_', '-')}: expected 0..{seq_len}, got {getattr(cfg, name)}")
        self.num_values = cfg.num_keys
        self._validations = 0
        self._ref = float("inf")  # eval loss at the last validation that made progress
        self._since_progress = 0

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        return cls(cfg)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        train = split == "train"
        self.datasets[split] = AssociativeRetrievalDataset(
            size=self.cfg.train_size if train else self.cfg.valid_size,
            num_keys=self.cfg.num_keys, setting=self.cfg.setting, key_vocab_size=self.key_vocab_size,
            num_queries=self.cfg.queries_per_seq if train else self.cfg.valid_queries_per_seq,
            seed=self.cfg.seed, split_id=SPLIT_IDS.get(split, len(SPLIT_IDS)), fresh_each_epoch=train)

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        logging_output["is_valid"] = 1  # lets reduce_metrics add stop_metric to validation stats only
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if any(log.get("is_valid", 0) for log in logging_outputs):
            metrics.log_derived("stop_metric", lambda meters: self._stop_metric(meters["loss"].avg))

    def _progress(self, loss):
        return loss < self._ref * (1.0 - self.cfg.stop_min_improvement)

    def _stop_metric(self, loss):
        """fairseq has no "stop at a target loss" option, so validation reports a stat that its
        --patience can use: stop_metric falls (-1, -2, ...) while training should go on and is +1
        once it should stop (loss < --stop-loss, or --stop-patience validations without progress),
        which --best-checkpoint-metric stop_metric --patience 1 turns into an immediate stop
        (from the second validation on: fairseq's patience needs a first value to compare to).
        Pure in (loss, state): the state moves on in post_validate."""
        since = 0 if self._progress(loss) else self._since_progress + 1
        done = loss < self.cfg.stop_loss or 0 < self.cfg.stop_patience <= since
        return 1 if done else -(self._validations + 1)

    def post_validate(self, model, stats, agg):
        loss = float(stats["loss"])
        self._validations += 1
        if self._progress(loss):
            self._ref, self._since_progress = loss, 0
        else:
            self._since_progress += 1

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
