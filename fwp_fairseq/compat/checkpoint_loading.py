"""Checkpoint files are loaded safely: fairseq's checkpoint_utils (every CLI that loads a
checkpoint: fairseq-train's resume and --restore-file, fairseq-generate, fairseq-interactive,
fairseq-eval-lm; and the Python API: load_model_ensemble, load_checkpoint_to_cpu) unpickles with
torch's weights-only unpickler, which builds tensors, containers, numbers and strings and calls
nothing else, plus this allowlist of what fairseq checkpoints hold besides:

- argparse.Namespace: the ``args`` of checkpoints written before fairseq 0.10, and of models
  whose options are still a Namespace (a plain fairseq ``transformer`` trained with 0.12, our
  fwp_transformer; found with torch.serialization.get_unsafe_globals_in_checkpoint);
- omegaconf's DictConfig and ListConfig with their metadata and node classes, and the plain
  types their metadata names (typing.Any, dict, list, int, ...): the ``cfg`` of checkpoints
  written while fairseq stored its config as omegaconf objects (0.12 stores plain dicts).

Unpickling these only sets their attributes. A file that holds anything else is refused before
any of it runs (CheckpointRefused, listing what it holds); a trusted file is loaded in full with
FWP_FAIRSEQ_TRUST_CHECKPOINTS=1 in the environment. A file that cannot be read (truncated by a
crash, written to a full disk) raises CheckpointUnreadable, naming the newest intact checkpoint
beside it. Scoped to fairseq.checkpoint_utils (torch_proxy): every other torch.load is left alone."""
import logging
import os
import pickle
import time
import zipfile

import torch

from .source_probe import probe_source
from .torch_proxy import replace_torch_load

logger = logging.getLogger(__name__)

TRUST_ENV = "FWP_FAIRSEQ_TRUST_CHECKPOINTS"
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch's pre-1.6 format: a pickled magic number first


class CheckpointRefused(pickle.UnpicklingError):
    """The checkpoint holds objects whose unpickling could run code; nothing of it ran."""


class CheckpointUnreadable(RuntimeError):
    """The checkpoint file is damaged (truncated, not a torch file)."""


def trusted():
    return os.environ.get(TRUST_ENV, "") == "1"


def allowed_globals():
    """What fairseq checkpoints hold beyond torch's own weights-only types (see the docstring)."""
    import argparse
    import collections
    import typing
    allowed = [argparse.Namespace]
    try:
        from omegaconf import base, dictconfig, listconfig, nodes
    except ImportError:
        return allowed
    return allowed + [
        dictconfig.DictConfig, listconfig.ListConfig, base.Metadata, base.ContainerMetadata,
        nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode,
        typing.Any, dict, list, int, float, str, bool, collections.defaultdict]


def _name(f):
    name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) else None


def _rewound(f, start):
    if start is not None:
        f.seek(start)
    return f


def _unsafe_globals(f, start):
    """What the file holds beyond the allowlist, or None where it cannot be read."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.serialization.get_unsafe_globals_in_checkpoint(_rewound(f, start))
    except Exception:
        return None


def damage(path):
    """Why the file at `path` is not an intact torch checkpoint, or None where it looks intact
    (zip format: every record's CRC checks; pre-1.6 format: its magic number)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if head == _LEGACY_MAGIC:
                return None
            if head != _ZIP_MAGIC:
                return f"it is not a torch checkpoint ({os.path.getsize(path)} bytes)"
            with zipfile.ZipFile(fh) as z:
                bad = z.testzip()
            return None if bad is None else f"its record {bad} is damaged"
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"it is truncated or damaged ({type(e).__name__}: {e})"


def newest_intact_beside(path):
    """The most recently written intact *.pt file in path's folder, other than path, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    others = [os.path.join(folder, n) for n in os.listdir(folder)
              if n.endswith(".pt") and os.path.join(folder, n) != os.path.abspath(path)]
    for other in sorted(others, key=os.path.getmtime, reverse=True):
        if damage(other) is None:
            return other
    return None


def _unreadable(path, why):
    if path is None:
        return CheckpointUnreadable(f"cannot read the checkpoint: {why}")
    msg = f"cannot read the checkpoint {path}: {why} (a crash or a full disk while it was written?)."
    intact = newest_intact_beside(path) if os.path.exists(path) else None
    if intact is None:
        msg += " No intact checkpoint lies beside it."
    else:
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(intact)))
        msg += (f" The newest intact checkpoint beside it is {intact} (written {written}): resume "
                f"from it with --restore-file {intact}, or move it to {path}.")
    return CheckpointUnreadable(msg)


def _refused(path, unsafe):
    return CheckpointRefused(
        f"refused to load the checkpoint {path or '(an unnamed file)'}: besides tensors and the "
        f"types fairseq checkpoints hold, it contains {', '.join(sorted(unsafe))}, which unpickling "
        "would import and call (a checkpoint can run any code this way); nothing in it has run. "
        f"If you trust this file, load it with {TRUST_ENV}=1 in the environment.")


def load_checkpoint_file(f, *args, **kwargs):
    """torch.load for fairseq's checkpoint_utils: weights-only with allowed_globals() (in full
    where trusted()); refusals and damaged files raise the errors above."""
    path = _name(f)
    start = f.tell() if hasattr(f, "seek") else None
    kwargs["weights_only"] = not trusted()
    try:
        if trusted():
            return torch.load(f, *args, **kwargs)
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(f, *args, **kwargs)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and not trusted():
            unsafe = _unsafe_globals(f, start)
            if unsafe:
                raise _refused(path, unsafe) from None
        why = damage(path) if path is not None and os.path.isfile(path) else None
        if why is None and isinstance(e, (EOFError, pickle.UnpicklingError)):
            why = f"{type(e).__name__}: {e}"
        if why is None:
            raise
        raise _unreadable(path, why) from e


def torch_can_allowlist():
    """torch's weights-only unpickler takes an allowlist (torch >= 2.5)."""
    return hasattr(torch.serialization, "safe_globals") and hasattr(
        torch.serialization, "get_unsafe_globals_in_checkpoint")


def needed():
    """Unless fairseq itself loads weights-only with an allowlist (or torch cannot)."""
    if not torch_can_allowlist():
        logger.warning("this torch has no weights-only allowlist: fairseq loads checkpoints in "
                       "full (load only checkpoints you trust)")
        return False
    from fairseq import checkpoint_utils
    return probe_source("checkpoint_loading", checkpoint_utils.load_checkpoint_to_cpu,
                        lambda source: "safe_globals" not in source, if_unreadable=True,
                        why="loading weights-only with an allowlist is safe with any fairseq")


def install():
    from fairseq import checkpoint_utils
    replace_torch_load(checkpoint_utils, load_checkpoint_file)
