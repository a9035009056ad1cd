"""The chunkwise tensor-core kernels of fwp_fairseq/csrc (chunk_fwd.cu, chunk_bwd.cu) in autograd.

Same semantics and API as cuda_backend's sequential recurrence (initial state, final state,
gradients to q, k, v, beta and the initial state), for fp16/bf16 inputs on the GPU with fp32
accumulation and an fp32 state (the CPU emulator runs the same source in fp32/fp64). No forget
gate: gated calls stay on the sequential kernel. Head sizes: Dk is padded with zeros to the next
of 16, 32, 64, 128, 256 and Dv to a multiple of 16 (at most 128).

The forward stores the state before every chunk (B*H*ceil(T/C)*Dk*Dv fp32) and, for the delta
rule, the write vectors U (B*H*T*Dv fp32); the backward returns the key-side gradients as one
partial per value tile, summed here in a fixed order (deterministic). Chunk length and value tile
are a configuration that fits the device's shared memory per block (chunk_smem.py).
"""
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import chunk_smem
from ._checks import accumulation_dtype
from .cuda_backend import _flat, _stream

KEY_SIZES = (16, 32, 64, 128, 256)
MAX_DV = 128
GPU_DTYPES = (torch.float16, torch.bfloat16)


def supports(q, v, g=None):
    """(ok, reason): whether the chunk kernels take this call on the GPU (device aside)."""
    if g is not None:
        return False, "the chunk kernels have no forget gate (the sequential kernel has)"
    if q.dtype not in GPU_DTYPES:
        return False, f"dtype {q.dtype}: the chunk kernels take fp16 and bf16"
    Dk, Dv = q.shape[-1], v.shape[-1]
    if Dk > KEY_SIZES[-1] or Dv > MAX_DV:
        return False, f"needs Dk <= {KEY_SIZES[-1]} and Dv <= {MAX_DV}, got Dk={Dk}, Dv={Dv}"
    return True, "ok"


class _Chunked(torch.autograd.Function):
    """Both rules on padded inputs (Dk in KEY_SIZES, Dv a multiple of 16); beta, h0 in acc."""

    @staticmethod
    def forward(ctx, q, k, v, beta, h0, ext, delta, store, config):
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        BH, acc = B * H, accumulation_dtype(q.dtype)
        q3, k3, v3 = _flat(q), _flat(k), _flat(v)
        b2 = _flat(beta) if delta else None
        h3 = None if h0 is None else _flat(h0)
        chunk, tile = config
        nc = math.ceil(T / chunk)
        o = torch.empty_like(v3)
        ht = q.new_empty(BH, Dk, Dv, dtype=acc)
        states = q.new_empty(BH, nc, Dk, Dv, dtype=acc) if store else None
        u = q.new_empty(BH, T, Dv, dtype=acc) if store and delta else None
        ext.chunk_forward(q3, k3, v3, b2, h3, o, ht, states, u, chunk, tile, delta, _stream(q))
        if store:
            ctx.save_for_backward(q3, k3, v3, b2, states, u)
        ctx.ext, ctx.delta, ctx.shape, ctx.config = ext, delta, (B, H, T, Dk, Dv), config
        return o.view(B, H, T, Dv), ht.view(B, H, Dk, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q3, k3, v3, b2, states, u = ctx.saved_tensors
        B, H, T, Dk, Dv = ctx.shape
        ext, delta, BH, acc = ctx.ext, ctx.delta, B * H, states.dtype
        do3 = torch.zeros_like(v3) if do is None else _flat(do, q3.dtype)
        dht3 = None if dht is None else _flat(dht, acc)
        C, tile = ctx.config
        Tp, tiles = math.ceil(T / C) * C, math.ceil(Dv / tile)
        part = lambda: q3.new_empty(tiles, BH, Tp, Dk, dtype=acc)  # noqa: E731
        dq_p, dk_p, dkb_p = part(), part(), (part() if delta else None)
        dvb = q3.new_empty(BH, T, Dv, dtype=acc)
        dh0 = q3.new_empty(BH, Dk, Dv, dtype=acc) if ctx.needs_input_grad[4] else None
        ext.chunk_backward(q3, k3, v3, b2, do3, states, u, dht3, dq_p, dk_p, dkb_p, dvb, dh0,
                           C, tile, delta, _stream(q3))
        dq = dq_p.sum(0)[:, :T]
        dk = dk_p.sum(0)[:, :T]
        dbeta = None
        if delta:  # the element-wise ends of the UT-form gradient (chunk_bwd.cu)
            dkb = dkb_p.sum(0)[:, :T]
            bcol = b2[..., None]
            dk = dk + bcol * dkb
            dbeta = ((dkb * k3.to(acc)).sum(-1) + (dvb * v3.to(acc)).sum(-1)).view(B, H, T)
            dvb = bcol * dvb
        dq = dq.to(q3.dtype).reshape(B, H, T, Dk)
        dk = dk.to(k3.dtype).reshape(B, H, T, Dk)
        dv = dvb.to(v3.dtype).view(B, H, T, Dv)
        dh0 = None if dh0 is None else dh0.view(B, H, Dk, Dv)
        return dq, dk, dv, dbeta, dh0, None, None, None, None


def padded_key_size(Dk):
    """The kernel's key size for Dk: the next of KEY_SIZES."""
    for n in KEY_SIZES:
        if Dk <= n:
            return n
    raise ValueError(f"impl='cuda' (chunk): Dk={Dk} exceeds {KEY_SIZES[-1]}")


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def choose_config(ext, q, k, v, beta, initial_state, delta):
    """((chunk, tile), None): the configuration this call runs with on the current device, or
    (None, reason) when no compiled one fits its shared memory (chunk_smem.py)."""
    Dk, Dv = padded_key_size(q.shape[-1]), v.shape[-1] + -v.shape[-1] % 16
    backward = _wants_grad(q, k, v, beta, initial_state)
    return chunk_smem.choose_config(ext, q, Dk, Dv, delta, backward)


def apply_chunked(ext, q, k, v, beta, initial_state, output_final_state, delta, config=None):
    """Pad, run _Chunked, unpad. `ext` is the extension or, in the CPU tests, the emulator;
    config: (chunk, tile) from choose_config (None: choose here, raise if none fits)."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    if Dv > MAX_DV:
        raise ValueError(f"impl='cuda' (chunk): Dv={Dv} exceeds {MAX_DV}")
    if config is None:
        config, why = choose_config(ext, q, k, v, beta, initial_state, delta)
        if config is None:
            raise RuntimeError(f"impl='cuda' (chunk): {why}")
    pk, pv = padded_key_size(Dk) - Dk, -Dv % 16
    acc = accumulation_dtype(q.dtype)
    if pk:  # zero key/query features write and read nothing
        q, k = F.pad(q, (0, pk)), F.pad(k, (0, pk))
    if pv:  # zero value columns stay zero and are cut off again
        v = F.pad(v, (0, pv))
    h0 = None
    if initial_state is not None:
        h0 = F.pad(initial_state.to(acc), (0, pv, 0, pk)) if pk or pv else initial_state.to(acc)
    b = beta.to(acc) if delta else None
    tensors = [t for t in (q, k, v, b, h0) if t is not None]
    store = _wants_grad(*tensors)
    o, ht = _Chunked.apply(q, k, v, b, h0, ext, delta, store, config)
    if pv:
        o = o[..., :Dv]
    if not output_final_state:
        return o, None
    return o, (ht[..., :Dk, :Dv].clone() if pk or pv else ht)  # owned: a view would keep the padded state
