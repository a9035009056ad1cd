"""fairseq 0.12's ``data_utils.batch_by_size`` drops the last batch when its size is not a
multiple of --required-batch-size-multiple (default 8). Harmless for training, wrong for
evaluation: fairseq-generate translates fewer sentences than the test set holds (461 -> 456 for
a 461-sentence set at --batch-size 64; sacreBLEU then refuses the output), validation loss and
BLEU skip sentences, with --max-tokens as with --batch-size (a known fairseq bug).

The fix keeps fairseq's batches exactly as they are and adds back the dropped tail as one more
batch (a valid batch: fairseq's own batching built it before dropping it). It applies to every
batching except the training iterator (``Trainer.get_train_iterator``, including batches that
--rebuild-batches makes later for each epoch), which keeps fairseq's exact behaviour so that no
training run changes. fairseq-interactive and fairseq-eval-lm already batch with a multiple of 1
and lose nothing. A fairseq whose batch_by_size keeps every index is left alone."""
import contextlib
import contextvars
import functools
import logging

import numpy as np

logger = logging.getLogger(__name__)

# True while fairseq builds training batches: those keep fairseq's own behaviour.
_building_train_batches = contextvars.ContextVar("fwp_building_train_batches", default=False)


@contextlib.contextmanager
def fairseq_batching():
    """Within this block batch_by_size behaves exactly as fairseq's own."""
    token = _building_train_batches.set(True)
    try:
        yield
    finally:
        _building_train_batches.reset(token)


def _data_utils():
    from fairseq.data import data_utils
    return data_utils


def _original(fn):
    return getattr(fn, "__wrapped__", fn)


def needed():
    """fairseq's own batch_by_size loses the last index of 9 equal-length ones batched with a
    required multiple of 8 (one batch of 8, then a batch of 1 that it drops)."""
    batch_by_size = _original(_data_utils().batch_by_size)
    batches = batch_by_size(np.arange(9, dtype=np.int64), num_tokens_fn=lambda i: 1,
                            num_tokens_vec=np.ones(9, dtype=np.int64), max_sentences=16,
                            required_batch_size_multiple=8)
    return sum(len(b) for b in batches) < 9


def _keeping_last_batch(batch_by_size):
    @functools.wraps(batch_by_size)
    def wrapper(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                required_batch_size_multiple=1, fixed_shapes=None):
        if not isinstance(indices, np.ndarray):  # as fairseq does; we need len() and slicing
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        batches = batch_by_size(indices, num_tokens_fn, num_tokens_vec=num_tokens_vec,
                                max_tokens=max_tokens, max_sentences=max_sentences,
                                required_batch_size_multiple=required_batch_size_multiple,
                                fixed_shapes=fixed_shapes)
        kept = sum(len(b) for b in batches)
        if (_building_train_batches.get() or fixed_shapes is not None
                or required_batch_size_multiple <= 1 or kept == len(indices)):
            return batches
        # fairseq's batches are consecutive slices of `indices`; only the last one was dropped.
        if kept and not np.array_equal(np.concatenate(batches), indices[:kept]):
            logger.warning(f"batch_by_size left out {len(indices) - kept} of {len(indices)} "
                           "indices in an unexpected way: not restored")
            return batches
        tail = indices[kept:]
        logger.info(f"kept the last batch ({len(tail)} of {len(indices)} sentences) "
                    f"that fairseq's batch_by_size drops: its size is not a multiple of "
                    f"--required-batch-size-multiple {required_batch_size_multiple}")
        return list(batches) + [tail]

    return wrapper


def _training_batches_as_fairseq(get_train_iterator):
    @functools.wraps(get_train_iterator)
    def wrapper(self, *args, **kwargs):
        with fairseq_batching():
            itr = get_train_iterator(self, *args, **kwargs)
        sampler = getattr(itr, "batch_sampler", None)
        if callable(sampler) and not getattr(sampler, "_fwp_fairseq_batching", False):
            # --rebuild-batches: the training batches are made later, once per epoch.
            @functools.wraps(sampler)
            def rebuild(*a, **kw):
                with fairseq_batching():
                    return sampler(*a, **kw)
            rebuild._fwp_fairseq_batching = True
            itr.batch_sampler = rebuild
        return itr

    return wrapper


def install():
    from fairseq.trainer import Trainer
    data_utils = _data_utils()
    if getattr(data_utils, "_fwp_eval_last_batch", False):
        return
    data_utils.batch_by_size = _keeping_last_batch(data_utils.batch_by_size)
    Trainer.get_train_iterator = _training_batches_as_fairseq(Trainer.get_train_iterator)
    data_utils._fwp_eval_last_batch = True
