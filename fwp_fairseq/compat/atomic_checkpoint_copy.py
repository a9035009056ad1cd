"""fairseq writes checkpoint_N.pt / checkpoint_E_U.pt atomically (a .tmp file, then a rename) but
then makes checkpoint_best.pt and checkpoint_last.pt with a plain copy onto the old file
(PathManager.copy -> shutil.copyfile): a kill or a preemption during that copy leaves a truncated
checkpoint_last.pt, and the next fairseq-train cannot resume.

The fix: fairseq.checkpoint_utils's name ``PathManager`` becomes a stand-in whose copy() of a
local file copies to "<destination>.tmp" in the same folder, syncs it to disk, then renames it
over the destination (a rename within a folder is atomic), so the destination is always either
the old complete file or the new one. Everything else, and remote paths, go to fairseq's
PathManager unchanged."""
import os
import shutil

from .source_probe import probe_source


class _AtomicCopyPathManager:
    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    def copy(self, src_path, dst_path, overwrite=False):
        pm = self._path_manager
        if pm.path_requires_pathmanager(src_path) or pm.path_requires_pathmanager(dst_path):
            return pm.copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        tmp = dst_path + ".tmp"
        shutil.copyfile(src_path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the data
        os.replace(tmp, dst_path)
        return True


def _checkpoint_utils():
    from fairseq import checkpoint_utils
    return checkpoint_utils


def needed():
    """fairseq's save_checkpoint still copies onto checkpoint_last.pt / checkpoint_best.pt."""
    return probe_source("atomic_checkpoint_copy", _checkpoint_utils().save_checkpoint,
                        lambda source: "PathManager.copy(" in source, if_unreadable=True,
                        why="an atomic copy writes the same file as a plain one")


def install():
    checkpoint_utils = _checkpoint_utils()
    if not isinstance(checkpoint_utils.PathManager, _AtomicCopyPathManager):
        checkpoint_utils.PathManager = _AtomicCopyPathManager(checkpoint_utils.PathManager)
