"""numpy >= 2 removed ``np.compat``; fairseq 0.12 still spells int64 as ``np.compat.long`` in
TokenBlockDataset's "eos" break mode (the language_modeling task's inference dataset, i.e.
fairseq-interactive with an LM) and in LanguagePairDataset. Scoped like checkpoint_compat: the
module-level name ``np`` of those two fairseq modules becomes a proxy that adds ``compat.long``;
numpy itself is left untouched."""
import types

import numpy as np


class _NumpyWithCompat(types.ModuleType):
    compat = types.SimpleNamespace(long=np.int64)

    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        return getattr(np, name)


def install():
    if hasattr(np, "compat"):
        return  # numpy < 2: nothing to do
    from fairseq.data import language_pair_dataset, token_block_dataset
    for module in (token_block_dataset, language_pair_dataset):
        if getattr(module, "np", None) is np:
            module.np = _NumpyWithCompat()


install()
