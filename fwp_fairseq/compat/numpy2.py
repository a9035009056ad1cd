"""numpy >= 2 removed ``np.compat``; fairseq 0.12 still spells int64 as ``np.compat.long`` in
TokenBlockDataset's "eos" break mode (the language_modeling task's inference dataset, i.e.
fairseq-interactive with an LM) and in LanguagePairDataset. Scoped like checkpoint_loading: the
module-level name ``np`` of those two fairseq modules becomes a proxy that adds ``compat.long``;
numpy itself is left untouched."""
import types

import numpy as np

from .source_probe import probe_source


class _NumpyWithCompat(types.ModuleType):
    compat = types.SimpleNamespace(long=np.int64)

    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        return getattr(np, name)


def _modules():
    from fairseq.data import language_pair_dataset, token_block_dataset
    return token_block_dataset, language_pair_dataset


def _uses_compat(module):
    return probe_source("numpy2", module, lambda source: "np.compat" in source, if_unreadable=True,
                        why="the proxy only adds np.compat.long to what numpy has")


def needed():
    """numpy >= 2 and a fairseq module that still spells np.compat.long."""
    return not hasattr(np, "compat") and any(_uses_compat(m) for m in _modules())


def install():
    for module in _modules():
        if getattr(module, "np", None) is np and _uses_compat(module):
            module.np = _NumpyWithCompat()
