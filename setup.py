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

setup(
    name="fwp_fairseq",
    version="0.1.0",
    description="Fast weight programmers (linear transformers, delta rule, DPFP) for fairseq",
    packages=find_packages(include=["fwp_fairseq", "fwp_fairseq.*"]),
    package_data={"fwp_fairseq": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h", "csrc/*.cuh"]},
    python_requires=">=3.9",
    install_requires=requires,
    extras_require={"test": ["pytest", "matplotlib"]},
)
