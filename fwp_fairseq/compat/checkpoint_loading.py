"""torch >= 2.6 made torch.load default to weights_only=True, which cannot unpickle fairseq's
checkpoints (they hold argparse.Namespace / omegaconf objects: "Unsupported global").

The fix is scoped to two fairseq modules: their module-level name ``torch`` is replaced by a
proxy whose ``load`` defaults to weights_only=False; every other torch.load in the process keeps
torch's safe default. Affected: fairseq.checkpoint_utils (checkpoint loading in train, generate,
interactive, eval-lm) and fairseq.distributed.utils (objects exchanged between trusted workers).
fairseq imports --user-dir before it loads any checkpoint, so no environment variable is needed.
Only load checkpoints you trust, as with any pickle."""
import functools
import types

import torch


class _TorchWithFullLoad(types.ModuleType):
    """Delegates to torch; load() unpickles full objects unless told otherwise."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    @functools.wraps(torch.load)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def _patch(module):
    if getattr(module, "torch", None) is torch:
        module.torch = _TorchWithFullLoad()


def _modules():
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    return checkpoint_utils, distributed_utils


def needed():
    """torch >= 2.6 loads weights only by default; a fairseq that says weights_only=False
    itself needs nothing."""
    import inspect
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        return False
    from fairseq import checkpoint_utils
    return "weights_only" not in inspect.getsource(checkpoint_utils.load_checkpoint_to_cpu)


def install():
    for module in _modules():
        _patch(module)
