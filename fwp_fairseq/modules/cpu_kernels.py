"""The compiled CPU paths of the short convolution and the output norm (csrc/short_conv_cpu.cpp,
csrc/output_norm_cpu.cpp): built just in time with torch.utils.cpp_extension on first use (a
C++ compiler and ninja; about a minute, once per machine: torch caches the build), for fp32 and
fp64 CPU tensors. On the CPU each elementwise PyTorch op is a pass over memory; these kernels
make one pass each way. Where the module cannot be built, or with FWP_FAIRSEQ_CPU_KERNELS=0,
short_conv.py and output_norm.py run their PyTorch paths (the references; the same numbers up
to the order of the sums), after one warning saying why."""
import glob
import os
import platform
import sys
import warnings

import torch

from ..ops.jit_build import CSRC, put_venv_ninja_on_path

SOURCES = [os.path.join(CSRC, f) for f in ("cpu_binding.cpp", "short_conv_cpu.cpp", "output_norm_cpu.cpp")]
ENV = "FWP_FAIRSEQ_CPU_KERNELS"
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


def _build(name, flags):
    from torch.utils import cpp_extension
    put_venv_ninja_on_path()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    if not glob.glob(os.path.join(root, "**", name, name + "*.so"), recursive=True):
        print("fwp_fairseq: building the CPU kernels (short convolution, output norm; once per machine, "
              "about a minute)...", file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=SOURCES, extra_cflags=["-O3", *flags], verbose=False)


def extension():
    """The built module, or None (then the reason is warned once)."""
    if "module" in _state:
        return _state["module"]
    module, why = None, None
    if os.environ.get(ENV, "1") == "0":
        why = f"{ENV}=0"
    else:
        flags = _vector_flags()
        try:
            module = _build("fwp_cpu_kernels" + ("_avx2" if flags else ""), flags)
        except Exception as e:  # no compiler, no ninja, a read-only cache: the PyTorch paths work
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if module is None:
        warnings.warn(f"fwp_fairseq: the short convolution and the output norm run their PyTorch paths "
                      f"(slower on the CPU) ({why})")
    _state["module"] = module
    return module


def applies(*tensors):
    """Whether the compiled paths take these tensors: fp32/fp64 on the CPU, one dtype, and the
    module builds."""
    dtypes = {t.dtype for t in tensors}
    return (all(t.device.type == "cpu" for t in tensors) and len(dtypes) == 1
            and dtypes <= {torch.float32, torch.float64} and extension() is not None)


def or_empty(t, like):
    """An optional kernel argument: t, or an empty tensor standing for None (pybind passes tensors)."""
    return like.new_empty(0) if t is None else t
