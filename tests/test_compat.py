"""The fairseq compatibility shims (fwp_fairseq/compat): each one's target still exists in the
installed fairseq and is patched once the plugin is loaded. A failure here means fairseq changed
underneath a shim: look at the shim's docstring before anything else."""
import inspect

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")
import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.compat import (atomic_checkpoint_copy, checkpoint_loading,  # noqa: E402
                                distributed_objects, eval_last_batch, numpy2, resume_batches,
                                torch_proxy, torchrun_cpu)


def test_checkpoint_loading_patches_fairseqs_torch_load():
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils
    assert "torch.load(" in inspect.getsource(checkpoint_utils.load_checkpoint_to_cpu), \
        "fairseq no longer calls torch.load in load_checkpoint_to_cpu: the shim patches nothing"
    assert "torch.load(" in inspect.getsource(utils._broadcast_object_slow), \
        "fairseq no longer calls torch.load in _broadcast_object_slow: the shim patches nothing"
    if not checkpoint_loading.needed():
        pytest.skip("this torch/fairseq loads fairseq checkpoints safely without the shim")
    assert isinstance(checkpoint_utils.torch, torch_proxy.TorchWithLoad)
    assert checkpoint_utils.torch.load is checkpoint_loading.load_checkpoint_file
    if distributed_objects.needed():  # objects between workers: unpickled in full
        assert isinstance(utils.torch, torch_proxy.TorchWithLoad)
        assert utils.torch.load is distributed_objects._full_load
    assert torch.load is checkpoint_loading.torch.load  # torch itself is left alone


def test_atomic_checkpoint_copy_wraps_fairseqs_copy():
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager
    for name in ("copy", "path_requires_pathmanager"):
        assert callable(getattr(PathManager, name, None)), f"fairseq's PathManager.{name} is gone"
    if not atomic_checkpoint_copy.needed():
        pytest.skip("this fairseq no longer copies onto checkpoint_last.pt")
    assert isinstance(checkpoint_utils.PathManager, atomic_checkpoint_copy._AtomicCopyPathManager)
    assert checkpoint_utils.PathManager.open is PathManager.open  # everything else is fairseq's


def test_numpy2_gives_fairseqs_datasets_np_compat():
    from fairseq.data import language_pair_dataset, token_block_dataset
    if not numpy2.needed():
        pytest.skip("numpy < 2 or a fairseq without np.compat: nothing to patch")
    for module in (token_block_dataset, language_pair_dataset):
        if numpy2._uses_compat(module):
            assert module.np.compat.long is np.int64, module.__name__
    assert not hasattr(np, "compat")  # numpy itself is left alone


def test_torchrun_cpu_wraps_fairseqs_launch_set_up():
    from fairseq.distributed import utils
    for name in ("infer_init_method", "_infer_torch_distributed_launch_init"):
        assert callable(getattr(utils, name, None)), f"fairseq.distributed.utils.{name} is gone"
    if not torchrun_cpu.needed():
        assert not getattr(utils, "_fwp_torchrun_cpu", False)
        pytest.skip("this fairseq sets up torchrun without CUDA devices by itself")
    assert utils._fwp_torchrun_cpu
    assert utils.infer_init_method.__module__ == torchrun_cpu.__name__


def test_eval_last_batch_wraps_fairseqs_batching():
    from fairseq.data import data_utils, fairseq_dataset
    from fairseq.tasks.fairseq_task import FairseqTask
    from fairseq.trainer import Trainer
    batch_by_size = eval_last_batch._original(data_utils.batch_by_size)
    assert list(inspect.signature(batch_by_size).parameters) == [
        "indices", "num_tokens_fn", "num_tokens_vec", "max_tokens", "max_sentences",
        "required_batch_size_multiple", "fixed_shapes"], "fairseq's batch_by_size changed its arguments"
    assert "data_utils.batch_by_size(" in inspect.getsource(fairseq_dataset.FairseqDataset.batch_by_size), \
        "datasets no longer batch through data_utils.batch_by_size: the shim patches nothing"
    assert "dataset.batch_by_size(" in inspect.getsource(FairseqTask.get_batch_iterator)
    get_train_iterator = eval_last_batch._original(Trainer.get_train_iterator)
    assert "get_batch_iterator(" in inspect.getsource(get_train_iterator), \
        "Trainer.get_train_iterator no longer builds the training batches: training may change"
    # The shim adds back the indices after fairseq's batches: those must be a prefix of them.
    batches = batch_by_size(np.arange(461), lambda i: 1, num_tokens_vec=np.ones(461, dtype=np.int64),
                            max_sentences=64, required_batch_size_multiple=8)
    kept = np.concatenate(batches)
    assert np.array_equal(kept, np.arange(len(kept))), "fairseq's batches are no longer slices in order"
    if not eval_last_batch.needed():
        assert not getattr(data_utils, "_fwp_eval_last_batch", False)
        pytest.skip("this fairseq keeps the last batch by itself")
    assert len(kept) == 456  # 5 of 461 dropped: what the shim is for
    assert data_utils._fwp_eval_last_batch
    for patched in (data_utils.batch_by_size, Trainer.get_train_iterator):
        assert patched.__code__.co_filename == eval_last_batch.__file__, patched.__qualname__


def test_resume_batches_wraps_fairseqs_batch_iterator():
    from fairseq.tasks.fairseq_task import FairseqTask
    params = inspect.signature(FairseqTask.get_batch_iterator).parameters
    for name in ("dataset", "seed", "epoch", "disable_iterator_cache", "update_epoch_batch_itr"):
        assert name in params, f"FairseqTask.get_batch_iterator has no argument {name}"
    assert "seed=seed" in inspect.getsource(inspect.unwrap(FairseqTask.get_batch_iterator)), \
        "the iterator no longer takes the shuffling seed: the shim's itr.seed fix-up is wrong"
    if not resume_batches.needed():
        pytest.skip("this fairseq makes a reused iterator's batches independently of its creation epoch")
    assert FairseqTask.get_batch_iterator._fwp_resume_batches
