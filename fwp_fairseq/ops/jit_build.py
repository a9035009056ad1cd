"""What the just-in-time builds of fwp_fairseq/csrc share (the CUDA recurrences in cuda_backend.py,
the CPU kernels in modules/cpu_kernels.py): where the sources are, and finding ninja."""
import os
import shutil
import sys

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def put_venv_ninja_on_path():
    """torch's builder looks for ninja on PATH, which a virtualenv used without activating lacks:
    add the interpreter's own bin folder when the ninja is there (pip install ninja)."""
    bin_dir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
