"""State tracking: parity (modulus 2) or addition modulo m of a digit string, or the composition
of permutations of 3 elements (--group s3), generated from a seed (no files). Input x_1..x_T,
digits in 0..m-1; target at every position the running sum y_t = (x_1 + ... + x_t) mod m.
With --group s3 each input is one of the 6 permutations of (0, 1, 2), written in one-line
notation ("120": 0 -> 1, 1 -> 2, 2 -> 0), and the target is the composition so far,
y_t = x_t o y_{t-1} (first x_1, then x_2, ...): a non-abelian group, which one delta-rule write
per token cannot track in one layer but two can (Siems et al. 2025, DeltaProduct).
A language-model-shaped task (net_input src_tokens, target): any fairseq LM (fwp_lm,
transformer_lm) trains on it with the cross_entropy criterion.

Sample i of split s in epoch e is a pure function of (seed, s, e, i): training draws fresh
strings every epoch, validation is the same every time. Validation logs, next to the loss,
final_acc: the share of strings whose last position (the sum, or composition, of the whole
string) is right.
evaluate_lengths() measures it at lengths beyond training (Grazzi et al., ICLR 2025)."""
import itertools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.data import Dictionary
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from fwp_fairseq.data.generated import GeneratedDataset

SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
EVAL_SPLIT = 7  # the split id of evaluate_lengths' strings (apart from train / valid / test)
GROUPS = ("cyclic", "s3")


def make_dictionary(modulus, names=None):
    """The digits 0..m-1, or the given element names, as symbols."""
    d = Dictionary()
    for name in names if names is not None else map(str, range(modulus)):
        d.add_symbol(name)
    return d


def s3_table():
    """(names, table): the 6 permutations of (0, 1, 2) in one-line notation, identity first, and
    table[a, b] = the index of b o a (a first, then b), as an int64 (6, 6) array."""
    perms = list(itertools.permutations(range(3)))
    table = np.array([[perms.index(tuple(b[a[i]] for i in range(3))) for b in perms] for a in perms])
    return ["".join(map(str, p)) for p in perms], table.astype(np.int64)


def make_group_example(rng, table, length):
    """Elements x (T,) drawn uniformly, running compositions y_t = table[y_{t-1}, x_t] (T,)."""
    x = rng.integers(0, table.shape[0], size=length).astype(np.int64)
    y = np.empty_like(x)
    acc = x[0]
    y[0] = acc
    for t in range(1, length):
        acc = table[acc, x[t]]
        y[t] = acc
    return x, y


def make_example(rng, modulus, length):
    """digits (T,), running sums mod m (T,) as int64 arrays."""
    x = rng.integers(0, modulus, size=length)
    return x.astype(np.int64), (np.cumsum(x) % modulus).astype(np.int64)


class StateTrackingDataset(GeneratedDataset):
    def __init__(self, size, length, modulus, seed, split_id, fresh_each_epoch, offset, table=None):
        super().__init__(size, seed, split_id, fresh_each_epoch)
        self.length, self.modulus, self.table = length, modulus, table
        self.offset = offset  # dictionary index of the first element ("0", or the identity)

    def __getitem__(self, index):
        rng = self.rng(index)
        if self.table is None:
            x, y = make_example(rng, self.modulus, self.length)
        else:
            x, y = make_group_example(rng, self.table, self.length)
        return {"id": index, "source": torch.from_numpy(x + self.offset), "target": torch.from_numpy(y + self.offset)}

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        src = torch.stack([s["source"] for s in samples])
        return {"id": torch.tensor([s["id"] for s in samples]), "nsentences": len(samples),
                "ntokens": src.numel(),
                "net_input": {"src_tokens": src, "src_lengths": torch.full((len(samples),), src.size(1))},
                "target": torch.stack([s["target"] for s in samples])}

    def num_tokens(self, index):
        return self.length

    def size(self, index):
        return self.length


@dataclass
class StateTrackingConfig(FairseqDataclass):
    group: ChoiceEnum(GROUPS) = field(default="cyclic", metadata={
        "help": "cyclic: addition modulo --modulus (2: parity); s3: composition of permutations "
                "of 3 elements (6 symbols; --modulus does not apply)"})
    modulus: int = field(default=2, metadata={"help": "--group cyclic: 2: parity; m > 2: addition modulo m"})
    train_length: int = field(default=64, metadata={
        "help": "length of the training strings (every position is a target: all prefixes up to it)"})
    valid_length: int = field(default=0, metadata={"help": "length of the validation strings (0: --train-length)"})
    train_size: int = field(default=6400, metadata={"help": "strings per training epoch (fresh ones every epoch)"})
    valid_size: int = field(default=256, metadata={"help": "strings in the fixed validation set"})
    tokens_per_sample: int = field(default=1024, metadata={
        "help": "longest string the model is built for (its max positions)"})
    max_target_positions: Optional[int] = field(default=None, metadata={
        "help": "the LM's max positions (None: --tokens-per-sample)"})
    seed: int = II("common.seed")


@register_task("state_tracking", dataclass=StateTrackingConfig)
class StateTrackingTask(FairseqTask):
    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.modulus < 2:
            raise ValueError(f"--modulus: expected m >= 2, got {cfg.modulus}")
        group = str(getattr(cfg, "group", "cyclic"))
        if group not in GROUPS:
            raise ValueError(f"--group: expected one of {', '.join(GROUPS)}, got {group!r}")
        if group == "s3" and cfg.modulus != 2:
            raise ValueError(f"--modulus: applies to --group cyclic only, got {cfg.modulus} with --group s3")
        for name in ("train_length", "train_size", "valid_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(cfg, name)}")
        if cfg.valid_length < 0:
            raise ValueError(f"--valid-length: expected >= 0, got {cfg.valid_length}")
        names, self.table = s3_table() if group == "s3" else (None, None)
        self.dictionary = make_dictionary(cfg.modulus, names)
        self.num_classes = cfg.modulus if names is None else len(names)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        return cls(cfg)

    @property
    def offset(self):
        return self.dictionary.nspecial  # the first element's index (the symbols follow in order)

    def _dataset(self, size, length, split_id, fresh):
        return StateTrackingDataset(size, length, self.cfg.modulus, self.cfg.seed, split_id, fresh, self.offset,
                                    self.table)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        train = split == "train"
        length = self.cfg.train_length if train else (self.cfg.valid_length or self.cfg.train_length)
        self.datasets[split] = self._dataset(self.cfg.train_size if train else self.cfg.valid_size, length,
                                             SPLIT_IDS.get(split, len(SPLIT_IDS)), train)

    def _predictions(self, model, src_tokens):
        logits = model(src_tokens)[0]
        return logits[..., self.offset: self.offset + self.num_classes].argmax(-1) + self.offset

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        with torch.no_grad():
            pred = self._predictions(model, sample["net_input"]["src_tokens"])
        logging_output["final_correct"] = int((pred[:, -1] == sample["target"][:, -1]).sum())
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        correct = sum(log.get("final_correct", 0) for log in logging_outputs)
        if any("final_correct" in log for log in logging_outputs):
            n = sum(log.get("nsentences", 0) for log in logging_outputs)
            metrics.log_scalar("final_acc", correct / max(n, 1), n, round=4)

    @torch.no_grad()
    def evaluate_lengths(self, model, lengths, num_strings=256, batch_size=64):
        """{length: final-position accuracy} on num_strings fresh strings per length (a split of
        their own, from --seed): the share whose sum of the whole string is predicted right."""
        model.eval()
        device = next(model.parameters()).device
        result = {}
        for length in lengths:
            data = self._dataset(num_strings, length, EVAL_SPLIT, False)
            correct = 0
            for start in range(0, num_strings, batch_size):
                batch = data.collater([data[i] for i in range(start, min(start + batch_size, num_strings))])
                pred = self._predictions(model, batch["net_input"]["src_tokens"].to(device))
                correct += int((pred[:, -1].cpu() == batch["target"][:, -1]).sum())
            result[int(length)] = correct / num_strings
        return result

    def max_positions(self):
        return self.cfg.tokens_per_sample

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
