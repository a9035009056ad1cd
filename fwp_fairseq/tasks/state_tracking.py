"""State tracking: parity (modulus 2) or addition modulo m of a digit string, generated from a
seed (no files). Input x_1..x_T, digits in 0..m-1; target at every position the running sum
y_t = (x_1 + ... + x_t) mod m. A language-model-shaped task (net_input src_tokens, target):
any fairseq LM (fwp_lm, transformer_lm) trains on it with the cross_entropy criterion.

Sample i of split s in epoch e is a pure function of (seed, s, e, i): training draws fresh
strings every epoch, validation is the same every time. Validation logs, next to the loss,
final_acc: the share of strings whose last position (the sum of the whole string) is right.
evaluate_lengths() measures it at lengths beyond training (Grazzi et al., ICLR 2025)."""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.data import Dictionary
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from fwp_fairseq.data.generated import GeneratedDataset

SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
EVAL_SPLIT = 7  # the split id of evaluate_lengths' strings (apart from train / valid / test)


def make_dictionary(modulus):
    d = Dictionary()
    for digit in range(modulus):
        d.add_symbol(str(digit))
    return d


def make_example(rng, modulus, length):
    """digits (T,), running sums mod m (T,) as int64 arrays."""
    x = rng.integers(0, modulus, size=length)
    return x.astype(np.int64), (np.cumsum(x) % modulus).astype(np.int64)


class StateTrackingDataset(GeneratedDataset):
    def __init__(self, size, length, modulus, seed, split_id, fresh_each_epoch, offset):
        super().__init__(size, seed, split_id, fresh_each_epoch)
        self.length, self.modulus = length, modulus
        self.offset = offset  # dictionary index of the digit "0"

    def __getitem__(self, index):
        rng = self.rng(index)
        x, y = make_example(rng, self.modulus, self.length)
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
    modulus: int = field(default=2, metadata={"help": "2: parity; m > 2: addition modulo m"})
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
        for name in ("train_length", "train_size", "valid_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(cfg, name)}")
        if cfg.valid_length < 0:
            raise ValueError(f"--valid-length: expected >= 0, got {cfg.valid_length}")
        self.dictionary = make_dictionary(cfg.modulus)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        return cls(cfg)

    @property
    def offset(self):
        return self.dictionary.index("0")

    def _dataset(self, size, length, split_id, fresh):
        return StateTrackingDataset(size, length, self.cfg.modulus, self.cfg.seed, split_id, fresh, self.offset)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        train = split == "train"
        length = self.cfg.train_length if train else (self.cfg.valid_length or self.cfg.train_length)
        self.datasets[split] = self._dataset(self.cfg.train_size if train else self.cfg.valid_size, length,
                                             SPLIT_IDS.get(split, len(SPLIT_IDS)), train)

    def _predictions(self, model, src_tokens):
        logits = model(src_tokens)[0]
        return logits[..., self.offset: self.offset + self.cfg.modulus].argmax(-1) + self.offset

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
