"""fwp_stream_lm: language modelling on contiguous streams, for fast weights carried across
segments (the paper's Table 4 setting; arXiv 2102.11174, section 6.3).

Each split is one token sequence cut into parallel streams (fwp_fairseq.data.stream_dataset);
consecutive batches are consecutive segments of the same streams, never shuffled. With
--fwp-carry-state every causal fast-weight layer of fwp_lm carries its state (W and z) from
one segment to the next, detached (backpropagation within a segment), and resets it where the
streams start again: each epoch, each validation, each fairseq-eval-lm run (in training with
--fwp-carry-reset-segments N: each stream every N segments instead, staggered across the batch).
--fwp-eval-reset-segments N resets evaluation streams every N segments.
Resuming from a checkpoint restarts the state from zero (it is not saved). Training uses --batch-size streams
per worker (else --max-tokens / --tokens-per-sample); validation and fairseq-eval-lm use
--eval-streams per worker (1: every token scored once with all earlier context, so the
perplexity does not depend on --tokens-per-sample). Generation needs no stream: use
fairseq-generate / fairseq-interactive with --task language_modeling (constant-size state).
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.data import data_utils, iterators
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II

from ..data import TokenStream

logger = logging.getLogger(__name__)


@dataclass
class StreamLMConfig(LanguageModelingConfig):
    fwp_carry_state: bool = field(
        default=False, metadata={"help": "carry each layer's fast weights from one segment of a "
                                         "stream to the next (detached; reset each epoch and each "
                                         "evaluation; needs fwp_lm with --no-token-positional-embeddings)"})
    fwp_carry_reset_segments: int = field(
        default=0, metadata={"help": "training with --fwp-carry-state: reset each stream's state every N "
                                     "segments, the streams of a batch staggered (row r of B when "
                                     "(k + r*N//B) % N == 0 at the k-th training segment), and carry it "
                                     "over the start of a new pass, so that every batch holds states of "
                                     "all ages 0..N-1; 0: reset all streams at the start of each pass"})
    fwp_eval_reset_segments: int = field(
        default=0, metadata={"help": "validation and fairseq-eval-lm with --fwp-carry-state: reset the state "
                                     "every N segments (at segments 0, N, 2N, ...), e.g. the N a model was "
                                     "trained with, so that no state is older than in training; each token "
                                     "then sees the context since the last reset; 0: all earlier context"})
    eval_streams: int = field(
        default=1, metadata={"help": "streams per worker in validation and fairseq-eval-lm (1: every "
                                     "token is scored with all earlier context of its split)"})
    max_tokens: Optional[int] = II("dataset.max_tokens")
    train_subset: str = II("dataset.train_subset")


@register_task("fwp_stream_lm", dataclass=StreamLMConfig)
class StreamLanguageModelingTask(LanguageModelingTask):
    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        if getattr(args, "add_bos_token", False):
            raise ValueError("--add-bos-token: not supported by fwp_stream_lm (a stream has one start)")
        if targets and targets != ["future"]:
            raise ValueError("fwp_stream_lm: only next-token prediction (future target)")

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        if self.args.fwp_carry_state:
            if not hasattr(model, "set_carry_state"):
                raise ValueError(f"--fwp-carry-state: needs --arch fwp_lm (got {type(model).__name__})")
            if getattr(args, "checkpoint_activations", False):
                # Recomputing a layer in the backward would advance the carried state twice.
                raise ValueError("--fwp-carry-state: not supported with --checkpoint-activations")
            model.set_carry_state(True)
            model.set_carry_reset(self.args.fwp_carry_reset_segments, self.args.fwp_eval_reset_segments)
        elif self.args.fwp_carry_reset_segments or self.args.fwp_eval_reset_segments:
            raise ValueError("--fwp-carry-reset-segments, --fwp-eval-reset-segments: need --fwp-carry-state")
        return model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.args.data)
        path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        data = data_utils.load_indexed_dataset(path, self.dictionary, self.args.dataset_impl, combine=combine)
        if data is None:
            raise FileNotFoundError(f"Dataset not found: {split} ({path})")
        self.datasets[split] = TokenStream(data, self.source_dictionary.pad(), self.source_dictionary.eos())
        logger.info(f"{split}: {len(self.datasets[split]):,} tokens as one stream")

    def _streams_per_shard(self, split_is_train):
        if not split_is_train:
            return self.args.eval_streams
        if self.args.batch_size:
            return self.args.batch_size
        if self.args.max_tokens:
            return max(1, self.args.max_tokens // self.args.tokens_per_sample)
        raise ValueError("fwp_stream_lm: set the number of streams per worker with --batch-size")

    def _iterator(self, stream, streams, num_shards, shard_id, seed=1, num_workers=0, epoch=1,
                  data_buffer_size=0, skip_remainder_batch=False):
        segments = stream.segments(streams, self.args.tokens_per_sample, num_shards, shard_id)
        logger.info(f"worker {shard_id} of {num_shards}: streams {segments.first}..{segments.first + streams - 1} "
                    f"of {streams * num_shards}, {segments.stream_len:,} tokens each, {len(segments)} "
                    f"segments of {self.args.tokens_per_sample}")
        # The shards are already disjoint sets of streams: the iterator itself must not shard,
        # shuffle or regroup (one dataset item is one batch).
        return iterators.EpochBatchIterator(
            dataset=segments, collate_fn=segments.collater,
            batch_sampler=[[i] for i in range(len(segments))], seed=seed, num_shards=1, shard_id=0,
            num_workers=num_workers, epoch=epoch, buffer_size=data_buffer_size,
            disable_shuffling=True, skip_remainder_batch=skip_remainder_batch)

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                           num_shards=1, shard_id=0, num_workers=0, epoch=1, data_buffer_size=0,
                           disable_iterator_cache=False, skip_remainder_batch=False, **kwargs):
        if not isinstance(dataset, TokenStream):  # fairseq-interactive's inference dataset
            return super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences, max_positions=max_positions,
                ignore_invalid_inputs=ignore_invalid_inputs,
                required_batch_size_multiple=required_batch_size_multiple, seed=seed,
                num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                data_buffer_size=data_buffer_size, disable_iterator_cache=disable_iterator_cache,
                skip_remainder_batch=skip_remainder_batch, **kwargs)
        is_train = dataset is self.datasets.get(self.args.train_subset)
        return self._iterator(dataset, self._streams_per_shard(is_train), num_shards, shard_id, seed=seed,
                              num_workers=num_workers, epoch=epoch, data_buffer_size=data_buffer_size,
                              skip_remainder_batch=skip_remainder_batch)

    def eval_lm_dataloader(self, dataset, max_tokens=36000, batch_size=None, max_positions=None,
                           num_shards=1, shard_id=0, num_workers=1, data_buffer_size=10, context_window=0):
        if context_window > 0:
            raise ValueError("--context-window: fwp_stream_lm scores each token once, in stream order "
                             "(with --fwp-carry-state, with all earlier context); no sliding window")
        return self._iterator(dataset, self.args.eval_streams, num_shards, shard_id, num_workers=num_workers,
                              data_buffer_size=data_buffer_size).next_epoch_itr(shuffle=False)
