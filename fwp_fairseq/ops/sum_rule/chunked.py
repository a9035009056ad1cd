"""Chunkwise-parallel sum rule, with a hand-written backward.

Inside chunk n the output is a causal (masked) product tril(Q_n K_n^T) V_n; across chunks the
state before chunk n is S_0 + sum_{m<n} K_m^T V_m. All products are batched over every chunk at
once; only the running sums of the (Dk x Dv) chunk states are a loop. Memory is linear in T."""
import torch

from .._checks import accumulation_dtype
from .._chunking import from_chunks, pick_chunk_size, to_chunks

CHUNK = 64


def _prefix_states(kv, S0):
    """states[n] = S0 + sum_{m<n} kv[m]; also returns the final state."""
    states = torch.empty_like(kv)
    S = S0
    for n in range(kv.shape[0]):
        states[n] = S
        S = S + kv[n]
    return states, S


def _suffix_grads(dS_read, dS_final):
    """Gradient w.r.t. chunk n's write kv[n]: dS_final + sum_{m>n} dS_read[m]; also returns the
    gradient w.r.t. S0 (dS_final + every read)."""
    d_kv = torch.empty_like(dS_read)
    dS = dS_final
    for n in range(dS_read.shape[0] - 1, -1, -1):
        d_kv[n] = dS
        dS = dS + dS_read[n]
    return d_kv, dS


class _SumChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, chunk_size):
        acc = accumulation_dtype(q.dtype)
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        C = pick_chunk_size(T, chunk_size)
        Q, K, V = (to_chunks(x.to(acc), C) for x in (q, k, v))  # (N, BH, C, D)
        if initial_state is None:
            S0 = q.new_zeros(B * H, Dk, Dv, dtype=acc)
        else:
            S0 = initial_state.to(acc).reshape(B * H, Dk, Dv)
        P = (Q @ K.transpose(-1, -2)).tril_()  # read after write: the diagonal is kept
        states, S = _prefix_states(K.transpose(-1, -2) @ V, S0)
        O = (P @ V).add_(Q @ states)
        ctx.save_for_backward(Q, K, V, P, states)
        ctx.meta = (B, H, T, q.dtype, None if initial_state is None else initial_state.dtype)
        return from_chunks(O, B, H, T).to(q.dtype), S.reshape(B, H, Dk, Dv)

    @staticmethod
    def backward(ctx, do, dsf):
        Q, K, V, P, states = ctx.saved_tensors
        B, H, T, in_dtype, state_dtype = ctx.meta
        C, Dk, Dv = Q.shape[2], K.shape[-1], V.shape[-1]
        dO = to_chunks(do.to(Q.dtype), C)
        dSf = Q.new_zeros(B * H, Dk, Dv) if dsf is None else dsf.to(Q.dtype).reshape(B * H, Dk, Dv)
        d_kv, dS0 = _suffix_grads(Q.transpose(-1, -2) @ dO, dSf)
        dP = (dO @ V.transpose(-1, -2)).tril_()
        dQ = (dP @ K).add_(dO @ states.transpose(-1, -2))
        dK = (dP.transpose(-1, -2) @ Q).add_(V @ d_kv.transpose(-1, -2))
        dV = (P.transpose(-1, -2) @ dO).add_(K @ d_kv)
        dq, dk, dv = (from_chunks(x, B, H, T).to(in_dtype) for x in (dQ, dK, dV))
        ds0 = None if state_dtype is None else dS0.reshape(B, H, Dk, Dv).to(state_dtype)
        return dq, dk, dv, ds0, None


def sum_rule_chunked(q, k, v, initial_state=None, output_final_state=False, chunk_size=CHUNK):
    o, final = _SumChunked.apply(q, k, v, initial_state, chunk_size)
    return o, (final if output_final_state else None)
