"""Datasets of synthetic examples drawn on the fly (the associative retrieval and state tracking
tasks): example `index` of a split comes from a generator seeded by (seed, split, epoch, index),
so it is the same in every run and on every worker."""
import numpy as np
from fairseq.data import FairseqDataset


class GeneratedDataset(FairseqDataset):
    """num_examples examples; fresh_each_epoch draws new ones every epoch (training), otherwise
    every epoch sees epoch 0's (a fixed validation set). Subclasses draw from self.rng(index)."""

    def __init__(self, num_examples, seed, split_id, fresh_each_epoch):
        self.num_examples = num_examples
        self.seed, self.split_id, self.fresh_each_epoch = seed, split_id, fresh_each_epoch
        self.epoch = 1

    def rng(self, index):
        epoch = self.epoch if self.fresh_each_epoch else 0
        return np.random.default_rng([self.seed, self.split_id, epoch, int(index)])

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def can_reuse_epoch_itr_across_epochs(self):
        return True  # batches are index lists; the content changes through set_epoch

    def __len__(self):
        return self.num_examples

    def ordered_indices(self):
        return np.arange(len(self), dtype=np.int64)
