"""Everything fairseq needs to see when it loads ``--user-dir fwp_fairseq``: every module in
models/, tasks/ and criterions/ is imported so that its @register_* decorators run."""
import importlib
import pkgutil

from . import checkpoint_compat  # noqa: F401  (torch>=2.6 checkpoint loading)
from . import numpy_compat  # noqa: F401  (numpy>=2: np.compat in fairseq's LM inference data)
from . import distributed_compat  # noqa: F401  (torchrun on CPU)
from . import criterions, models, tasks


def _import_all(package):
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


for _pkg in (models, tasks, criterions):
    _import_all(_pkg)
