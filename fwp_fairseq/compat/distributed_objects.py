"""torch >= 2.6 made torch.load default to weights_only=True; fairseq's distributed utils
unpickle with it the objects that workers of one job send each other (logging outputs, the
checkpoint state rank 0 broadcasts), which can hold any Python object. Those bytes come from the
job's own workers over its process group, not from a file: they are unpickled in full, as fairseq
did before torch 2.6. Scoped to fairseq.distributed.utils (torch_proxy)."""
import torch

from .source_probe import probe_source
from .torch_proxy import replace_torch_load


def _full_load(*args, **kwargs):
    kwargs.setdefault("weights_only", False)
    return torch.load(*args, **kwargs)


def needed():
    """torch >= 2.6, and a fairseq that does not say weights_only itself."""
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        return False
    from fairseq.distributed import utils
    return probe_source("distributed_objects", utils._broadcast_object_slow,
                        lambda source: "weights_only" not in source, if_unreadable=True,
                        why="unpickling the job's own objects in full is what fairseq did before torch 2.6")


def install():
    from fairseq.distributed import utils
    replace_torch_load(utils, _full_load)
