"""fairseq 0.12 makes the training batches when it creates a data iterator, with the seed
``seed + epoch`` of that epoch, and keeps the iterator (and its batches, reshuffled each epoch)
for the whole run. A run resumed in epoch e >= 2 creates its iterator at epoch e and so trains on
other batches than the uninterrupted run, which made them at epoch 1 (same data, another
grouping): its losses differ from the first update after the resume.

The fix: a reusable iterator created at a later epoch makes its batches as at epoch 1, as the
uninterrupted run did; its per-epoch shuffling keeps fairseq's seed. Runs that start at epoch 1,
iterators that fairseq rebuilds each epoch (sharded data, --rebuild-batches, datasets that
cannot be reused) and validation are unchanged. Assumes the seed passed for the batches does
not itself change with the epoch (fairseq's default, without --update-ordered-indices-seed)."""
import functools
import inspect

from .source_probe import probe_source


def _task_class():
    from fairseq.tasks.fairseq_task import FairseqTask
    return FairseqTask


def _as_at_epoch_1(get_batch_iterator):
    signature = inspect.signature(get_batch_iterator)

    @functools.wraps(get_batch_iterator)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        epoch, seed, dataset = a["epoch"], a["seed"], a["dataset"]
        reused_later = (epoch > 1 and not a["disable_iterator_cache"] and not a["update_epoch_batch_itr"]
                        and not getattr(getattr(self, "cfg", None), "rebuild_batches", False)
                        and self.can_reuse_epoch_itr(dataset) and dataset not in self.dataset_to_epoch_iter)
        if not reused_later:
            return get_batch_iterator(*bound.args, **bound.kwargs)
        a["seed"] = seed - (epoch - 1)  # fairseq makes the batches with seed + epoch
        itr = get_batch_iterator(*bound.args, **bound.kwargs)
        itr.seed = seed  # the per-epoch shuffling: fairseq's own seed
        return itr

    return wrapper


def needed():
    """fairseq still makes a reusable iterator's batches with the seed of its creation epoch."""
    return probe_source("resume_batches", _task_class().get_batch_iterator,
                        lambda source: "numpy_seed(seed + epoch)" in source and "dataset_to_epoch_iter" in source,
                        if_unreadable=False,
                        why="the fix changes the batches of resumed runs, while without it a resumed "
                            "run trains correctly on other batches")


def install():
    task = _task_class()
    if not getattr(task.get_batch_iterator, "_fwp_resume_batches", False):
        task.get_batch_iterator = _as_at_epoch_1(task.get_batch_iterator)
        task.get_batch_iterator._fwp_resume_batches = True
