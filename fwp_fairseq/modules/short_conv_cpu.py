"""The compiled CPU path of the short convolution (csrc/short_conv_cpu.cpp): built just in time
with torch.utils.cpp_extension on first use (g++ and ninja; about a minute, once per machine:
torch caches the build), for fp32 and fp64 CPU tensors. Where it cannot be built, or with
FWP_FAIRSEQ_CPU_EXTENSION=0, the convolution runs the PyTorch path of short_conv.py (the same
numbers up to the order of the sums), with one warning saying why."""
import os
import platform
import sys
import warnings

import torch

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "short_conv_cpu.cpp")
ENV = "FWP_FAIRSEQ_CPU_EXTENSION"
_state = {}


def _vector_flags():
    """AVX2 + FMA where this x86 CPU has them (the build runs on the machine that uses it)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def extension():
    """The built module, or None (then the reason is warned once)."""
    if "module" in _state:
        return _state["module"]
    module, why = None, None
    if os.environ.get(ENV, "1") == "0":
        why = f"{ENV}=0"
    else:
        try:
            from torch.utils import cpp_extension
            vec = _vector_flags()
            print("fwp_fairseq: building the CPU short-convolution kernel (once per machine, about a minute)...",
                  file=sys.stderr, flush=True)
            module = cpp_extension.load(name="fwp_short_conv_cpu" + ("_avx2" if vec else ""), sources=[SOURCE],
                                        extra_cflags=["-O3", *vec], verbose=False)
        except Exception as e:  # no compiler, no ninja, a read-only cache: the PyTorch path works
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if module is None:
        warnings.warn(f"fwp_fairseq: the short convolution runs its PyTorch path (slower on the CPU) ({why})")
    _state["module"] = module
    return module


def applies(x):
    """Whether the compiled path takes x: fp32/fp64 on the CPU, and the module builds."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and extension() is not None
