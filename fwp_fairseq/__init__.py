"""fwp_fairseq: fast weight programmers for fairseq (load with ``--user-dir fwp_fairseq``).

The math core, ``fwp_fairseq.ops``, needs only PyTorch. The fairseq parts (models, tasks,
criterions) are registered when fairseq is already imported, which is the case whenever
fairseq loads this package through ``--user-dir``; call ``register()`` to do it by hand.
"""
import sys

__version__ = "0.1.0"


def register():
    """Import the fairseq-facing modules so that their @register_* decorators run."""
    from . import fairseq_plugin  # noqa: F401


if "fairseq" in sys.modules:
    register()
