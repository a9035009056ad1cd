"""Install fwp_fairseq: the fast-weight-programmer plugin for fairseq.

fairseq: users may already have a source install of fairseq's main branch, which we must not
clobber. We therefore only ask for ``ve-fairseq`` (a wheel build of fairseq main, see README)
when no fairseq distribution is installed. Pip's build isolation hides the target environment
from this file, so the Makefile installs with ``--no-build-isolation``; set
``FWP_FAIRSEQ_SKIP_FAIRSEQ=1`` to never add a fairseq requirement.
"""
import importlib.metadata as md
import importlib.util
import os

from setuptools import find_packages, setup


def _have_fairseq():
    for dist in ("fairseq", "ve-fairseq"):
        try:
            md.version(dist)
            return True
        except md.PackageNotFoundError:
            pass
    return importlib.util.find_spec("fairseq") is not None


requires = [
    "torch>=2.1",
    "numpy",
    "sacrebleu>=2.0",
    "sentencepiece",
]
if not os.environ.get("FWP_FAIRSEQ_SKIP_FAIRSEQ") and not _have_fairseq():
    requires.append("ve-fairseq>=0.12.3")


# --- optional CUDA extension (fwp_fairseq/csrc) ------------------------------------------------------
# Built at install time only when torch has CUDA, nvcc is found and a GPU is visible, or when
# FWP_FAIRSEQ_BUILD_CUDA=1 forces it (FWP_FAIRSEQ_BUILD_CUDA=0 never builds). Otherwise nothing
# happens here and fwp_fairseq/ops/cuda_backend.py builds the same sources just in time on first
# GPU use. torch is only imported when an nvcc is on the machine, so a plain CPU install stays fast.
def _cuda_extension_kwargs():
    import shutil

    flag = os.environ.get("FWP_FAIRSEQ_BUILD_CUDA", "")
    if flag == "0":
        return {}
    if flag != "1" and not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return {}
    if flag != "1" and not (torch.version.cuda and CUDA_HOME and torch.cuda.is_available()):
        return {}
    csrc = os.path.join("fwp_fairseq", "csrc")
    sources = [os.path.join(csrc, f) for f in
               ("binding.cpp", "recurrence_fwd.cu", "state_grad.cu", "qk_grad.cu", "chunk_fwd.cu",
                "chunk_bwd.cu")]
    ext = CUDAExtension("fwp_fairseq._fwp_cuda", sources,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}
# --- end of the optional CUDA extension ---------------------------------------------------------

setup(
    name="fwp_fairseq",
    version="0.1.0",
    description="Fast weight programmers (linear transformers, delta rule, DPFP) for fairseq",
    packages=find_packages(include=["fwp_fairseq", "fwp_fairseq.*"]),
    package_data={"fwp_fairseq": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h", "csrc/*.cuh"]},
    python_requires=">=3.9",
    install_requires=requires,
    extras_require={"test": ["pytest", "matplotlib"]},
    **_cuda_extension_kwargs(),
)
