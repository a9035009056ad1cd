"""Everything fairseq needs to see when it loads ``--user-dir fwp_fairseq``: every module in
models/, tasks/ and criterions/ is imported so that its @register_* decorators run."""
import importlib
import pkgutil

from . import compat, criterions, models, tasks

compat.install_all()  # before fairseq loads a checkpoint or sets up distributed training


def _import_all(package):
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


for _pkg in (models, tasks, criterions):
    _import_all(_pkg)
