"""impl="cuda": the compiled recurrences of fwp_fairseq/csrc, loaded once and wrapped in autograd.

The extension comes from the install (fwp_fairseq._fwp_cuda, built when CUDA was present or
FWP_FAIRSEQ_BUILD_CUDA=1) or, failing that, is built just in time on first GPU use with
torch.utils.cpp_extension.load (cached in the torch extensions directory).

Semantics are those of sum_rule/reference.py and delta_rule/reference.py, with an optional forget
gate g (B, H, T): a_t = exp(g_t) decays the state before each step's write (S'_t = a_t S_{t-1}; the
delta rule reads S'_t). State and accumulation are fp32 (fp64 for fp64 inputs), outputs in the
input dtype, and every result is deterministic.

kernel="sequential" (the default) runs the step-by-step recurrence (recurrence_fwd.cu, state_grad.cu,
qk_grad.cu); kernel="chunk" the chunkwise tensor-core kernels (cuda_chunk.py: fp16/bf16, no gate).
"""
import contextlib
import math
import os
import threading

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._checks import accumulation_dtype
from .jit_build import CSRC, put_venv_ninja_on_path

MAX_DK = 512
MAX_DV = 256
CK_EVERY = 128  # the backward restarts from an exact stored state every CK_EVERY steps
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

SOURCES = ("binding.cpp", "recurrence_fwd.cu", "state_grad.cu", "qk_grad.cu", "chunk_fwd.cu",
           "chunk_bwd.cu")
EXT_NAME = "fwp_fairseq_cuda"

_lock = threading.Lock()
_status = None
_ext = None


def _build():
    """The installed extension, else a just-in-time build of the same sources."""
    try:
        from .. import _fwp_cuda  # noqa: F401  (built by setup.py)
        return _fwp_cuda
    except ImportError:
        pass
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (nvcc; set CUDA_HOME)")
    put_venv_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    return cpp_extension.load(
        name=EXT_NAME,
        sources=[os.path.join(CSRC, s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        verbose=bool(os.environ.get("FWP_FAIRSEQ_VERBOSE_BUILD")),
    )


def _probe():
    global _ext
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
    try:
        _ext = _build()
    except Exception as e:  # a failed build must not break impl="auto"
        return False, f"the CUDA extension could not be built or loaded: {type(e).__name__}: {e}"
    return True, "ok"


def available():
    """(ok, reason): whether impl="cuda" can run here. Never raises; cached after the first call
    (which may build the extension, about a minute)."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    _status = _probe()
                except Exception as e:
                    _status = (False, f"probing CUDA failed: {type(e).__name__}: {e}")
    return _status


def supports(q, v):
    """(ok, reason): whether the kernels take these shapes and dtype (device aside)."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    if q.dtype not in DTYPES:
        return False, f"dtype {q.dtype} is not supported (fp32, fp16, bf16, fp64)"
    if Dk > MAX_DK or Dv > MAX_DV:
        return False, f"needs Dk <= {MAX_DK} and Dv <= {MAX_DV}, got Dk={Dk}, Dv={Dv}"
    return True, "ok"


def _flat(x, dtype=None):
    """x with (B, H) merged into one leading dim, optionally cast, contiguous and 16-byte
    aligned (the kernels read 16-byte pieces). Shared with cuda_chunk.py."""
    x = x.reshape(-1, *x.shape[2:])
    if dtype is not None:
        x = x.to(dtype)
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    return x


def _stream(x):
    """The current CUDA stream of x's device, 0 (none) for CPU tensors (the emulator)."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


class _Recurrence(torch.autograd.Function):
    """Both rules on padded inputs (Dk, Dv multiples of 8). beta, h0, g already in the acc dtype."""

    @staticmethod
    def forward(ctx, q, k, v, beta, h0, g, ext, delta, store):
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        BH = B * H
        acc = accumulation_dtype(q.dtype)
        q3, k3, v3 = _flat(q), _flat(k), _flat(v)
        b2 = _flat(beta) if delta else None
        a2 = None if g is None else _flat(g.exp())
        h3 = _flat(h0) if h0 is not None else None
        o = torch.empty_like(v3)
        ht = q.new_empty(BH, Dk, Dv, dtype=acc)
        ckpt = q.new_empty(BH, math.ceil(T / CK_EVERY), Dk, Dv, dtype=acc) if store else None
        err = q.new_empty(BH, T, Dv, dtype=acc) if store and delta else None
        ext.forward(q3, k3, v3, b2, a2, h3, o, ht, ckpt, err, CK_EVERY, delta, _stream(q))
        if store:
            ctx.save_for_backward(q3, k3, v3, b2, a2, ht, ckpt, err)
        ctx.ext, ctx.delta, ctx.shape = ext, delta, (B, H, T, Dk, Dv)
        return o.view(B, H, T, Dv), ht.view(B, H, Dk, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q3, k3, v3, b2, a2, ht, ckpt, err = ctx.saved_tensors
        B, H, T, Dk, Dv = ctx.shape
        BH = B * H
        acc = ht.dtype
        ext, delta, stream = ctx.ext, ctx.delta, _stream(q3)
        gated = a2 is not None
        do3 = torch.zeros_like(v3) if do is None else _flat(do, q3.dtype)
        dht3 = None if dht is None else _flat(dht, acc)
        du = torch.empty(BH, T, Dv, dtype=acc, device=q3.device)
        dh0 = torch.empty(BH, Dk, Dv, dtype=acc, device=q3.device) if ctx.needs_input_grad[4] else None
        ext.state_grad(q3, k3, do3, b2, a2, dht3, du, dh0, delta, stream)
        if delta:
            bcol = b2[..., None]
            u = bcol * err  # the forward's write vector, same fp product
            da = -(bcol * du)
            dv = bcol * du
            dbeta = (du * err).sum(-1).view(B, H, T)
        else:
            u, da, dv, dbeta = v3.to(acc).contiguous(), None, du, None
        dq = dk = dg = None
        need_g = gated and ctx.needs_input_grad[5]
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or need_g:
            dq, dk = torch.empty_like(q3), torch.empty_like(k3)
            lam = torch.empty(BH, T, Dk, dtype=acc, device=q3.device) if gated else None
            dkr = torch.empty_like(lam) if gated and delta else None
            ext.qk_grad(q3, k3, do3, u, da, a2, None if gated else ht, dht3, ckpt, dq, dk, dkr, lam,
                        CK_EVERY, delta, stream)
            dq, dk = dq.view(B, H, T, Dk), dk.view(B, H, T, Dk)
            if need_g:  # lam: per key row, dL/dLambda summed from the end; + the final state's read
                dg = lam.sum(-1)
                if dht3 is not None:
                    dg = dg + (dht3 * ht).sum((-2, -1))[:, None]
                dg = dg.view(B, H, T)
        dh0 = None if dh0 is None else dh0.view(B, H, Dk, Dv)
        return dq, dk, dv.to(v3.dtype).view(B, H, T, Dv), dbeta, dh0, dg, None, None, None


def _device_of(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _apply(ext, q, k, v, beta, initial_state, output_final_state, delta, g=None):
    """Pad to multiples of 8, run _Recurrence, unpad. `ext` is the extension (or, in the CPU
    tests, the emulator with the same three functions)."""
    ok, why = supports(q, v)
    if not ok:
        raise ValueError(f"impl='cuda': {why}")
    if g is not None and tuple(g.shape) != tuple(q.shape[:3]):
        raise ValueError(f"impl='cuda': g must have shape (B, H, T) = {tuple(q.shape[:3])}, "
                         f"got {tuple(g.shape)}")
    Dk, Dv = q.shape[-1], v.shape[-1]
    pk, pv = -Dk % 8, -Dv % 8
    acc = accumulation_dtype(q.dtype)
    if pk:  # zero key/query features are inert: they write and read nothing
        q, k = F.pad(q, (0, pk)), F.pad(k, (0, pk))
    if pv:  # zero value columns stay zero and are cut off again
        v = F.pad(v, (0, pv))
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(acc)
        if pk or pv:
            h0 = F.pad(h0, (0, pv, 0, pk))
    b = beta.to(acc) if delta else None
    g = None if g is None else g.to(acc)
    tensors = [t for t in (q, k, v, b, h0, g) if t is not None]
    store = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    with _device_of(q):
        o, ht = _Recurrence.apply(q, k, v, b, h0, g, ext, delta, store)
    if pv:
        o = o[..., :Dv]
    if not output_final_state:
        return o, None
    return o, (ht[..., :Dk, :Dv].clone() if pk or pv else ht)  # owned: a view would keep the padded state


def _extension(q):
    if not q.is_cuda:
        raise ValueError(f"impl='cuda' needs CUDA tensors, got q on {q.device}")
    ok, why = available()
    if not ok:
        raise RuntimeError(f"impl='cuda' is unavailable: {why}")
    return _ext


KERNELS = ("sequential", "chunk")


def _run(q, k, v, beta, initial_state, output_final_state, delta, g, kernel):
    """The sequential recurrence (any dtype, gate) or the chunkwise tensor-core kernels
    (cuda_chunk: fp16/bf16, no gate, Dk <= 256, Dv <= 128)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    ext = _extension(q)
    if kernel == "sequential":
        return _apply(ext, q, k, v, beta, initial_state, output_final_state, delta, g)
    from . import chunk_smem, cuda_chunk

    ok, why = cuda_chunk.supports(q, v, g)
    if not ok:
        raise ValueError(f"kernel='chunk': {why}; use kernel='sequential'")
    with _device_of(q):
        config, why = cuda_chunk.choose_config(ext, q, k, v, beta, initial_state, delta)
    if config is None:  # the device's shared memory per block is too small for every configuration
        chunk_smem.log_fallback(why)
        return _apply(ext, q, k, v, beta, initial_state, output_final_state, delta, g)
    with _device_of(q):
        return cuda_chunk.apply_chunked(ext, q, k, v, beta, initial_state, output_final_state, delta,
                                        config)


def sum_rule_cuda(q, k, v, initial_state=None, output_final_state=False, g=None,
                  kernel="sequential"):
    """S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t on the GPU, with a_t = exp(g_t) for a
    log-decay g (B, H, T), else 1. kernel: "sequential" or "chunk". Returns (o, final_state or
    None)."""
    return _run(q, k, v, None, initial_state, output_final_state, False, g, kernel)


def delta_rule_cuda(q, k, v, beta, initial_state=None, output_final_state=False, g=None,
                    kernel="sequential"):
    """S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T, o_t = S_t^T q_t on the GPU,
    with a_t = exp(g_t) for a log-decay g (B, H, T), else 1. kernel: "sequential" or "chunk"."""
    return _run(q, k, v, beta, initial_state, output_final_state, True, g, kernel)
