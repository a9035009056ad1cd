"""Guarded fixes for the fairseq versions we run on, installed when fairseq loads the plugin.

Each module patches one thing in one fairseq module, only where that thing still needs it (its
``needed()`` says whether), and leaves a fairseq that no longer needs it alone. tests/test_compat.py
fails loudly when fairseq changes underneath a patch."""
from . import (atomic_checkpoint_copy, checkpoint_loading, distributed_objects, eval_last_batch,
               numpy2, resume_batches, torchrun_cpu)

SHIMS = (atomic_checkpoint_copy, checkpoint_loading, distributed_objects, eval_last_batch, numpy2,
         resume_batches, torchrun_cpu)


def install_all():
    """Install every shim whose problem this fairseq/torch/numpy still has."""
    for shim in SHIMS:
        if shim.needed():
            shim.install()
