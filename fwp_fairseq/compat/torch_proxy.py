"""A stand-in for the name ``torch`` inside one fairseq module: everything is torch's, except
``load``. The shims that change how fairseq unpickles (checkpoint_loading, distributed_objects)
install it in the modules they fix, so that every other torch.load in the process is left alone."""
import types

import torch


class TorchWithLoad(types.ModuleType):
    """Delegates to torch; load() is the given function (with torch.load's signature)."""

    def __init__(self, load):
        super().__init__("torch")
        self.load = load

    def __getattr__(self, name):
        return getattr(torch, name)


def replace_torch_load(module, load):
    """module.torch becomes a TorchWithLoad(load), unless module.torch is not torch itself."""
    if getattr(module, "torch", None) is torch:
        module.torch = TorchWithLoad(load)
