"""The compat shims' needed() probes read fairseq's source; a fairseq installed without its
sources (.pyc only, zipped) must not break loading the plugin: each probe then gives its
conservative answer and logs why (fwp_fairseq/compat/source_probe.py)."""
import inspect
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")
import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq import compat  # noqa: E402
from fwp_fairseq.compat import (atomic_checkpoint_copy, checkpoint_loading,  # noqa: E402
                                distributed_objects, numpy2, resume_batches, torchrun_cpu)

# The answer each probe gives without sources: apply where applying is harmless (a proxy that
# only adds np.compat.long; loading weights-only; an atomic copy; unpickling the job's own
# objects in full), skip where it would replace fairseq's own set-up (torchrun on CPU: without
# the fix the failure is loud, with it a fixed fairseq could change) or change training batches.
TORCH_2_6 = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)
WITHOUT_SOURCES = {numpy2: not hasattr(np, "compat"), torchrun_cpu: False,
                   checkpoint_loading: checkpoint_loading.torch_can_allowlist(),
                   atomic_checkpoint_copy: True, distributed_objects: TORCH_2_6, resume_batches: False}


@pytest.mark.parametrize("error", [OSError("could not get source code"), TypeError("built-in module")])
def test_probes_decide_without_fairseqs_sources(monkeypatch, caplog, error):
    def no_source(obj):
        raise error
    monkeypatch.setattr(inspect, "getsource", no_source)
    with caplog.at_level(logging.WARNING):
        for shim, expected in WITHOUT_SOURCES.items():
            assert shim.needed() == expected, shim.__name__
        compat.install_all()  # what loading --user-dir does: must not raise
    assert "cannot read the source" in caplog.text and type(error).__name__ in caplog.text
