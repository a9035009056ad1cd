"""Chunkwise-parallel sum rule, with a hand-written backward.

Inside chunk n the output is a causal (masked) product tril(Q_n K_n^T) V_n; across chunks the
state before chunk n is S_0 + sum_{m<n} K_m^T V_m. All products are batched over every chunk at
once; only the running sums of the (Dk x Dv) chunk states are a loop. Memory is linear in T."""
import torch

from .._checks import accumulation_dtype
from .._chunking import acc_bmm, bmm, from_chunks, pick_chunk_size, to_chunks

CHUNK = 64


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
        N = Q.shape[0]
        P = bmm(Q, K.transpose(-1, -2)).tril_()  # read after write: the diagonal is kept
        states = bmm(K.transpose(-1, -2), V)  # what each chunk writes, turned in place into
        S = S0                                # the state before each chunk
        for n in range(N):
            S, states[n] = S + states[n], S
        O = acc_bmm(bmm(Q, states), P, V)
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
        # Chunk n's write reaches every later read and the final state: a suffix sum, in place.
        d_kv = bmm(Q.transpose(-1, -2), dO)  # gradient w.r.t. the state each chunk reads
        dS = dSf
        for n in range(Q.shape[0] - 1, -1, -1):
            dS, d_kv[n] = dS + d_kv[n], dS
        dS0 = dS
        dP = bmm(dO, V.transpose(-1, -2)).tril_()
        dQ = acc_bmm(bmm(dP, K), dO, states.transpose(-1, -2))
        dK = acc_bmm(bmm(dP.transpose(-1, -2), Q), V, d_kv.transpose(-1, -2))
        dV = acc_bmm(bmm(P.transpose(-1, -2), dO), K, d_kv)
        dq, dk, dv = (from_chunks(x, B, H, T).to(in_dtype) for x in (dQ, dK, dV))
        ds0 = None if state_dtype is None else dS0.reshape(B, H, Dk, Dv).to(state_dtype)
        return dq, dk, dv, ds0, None


def sum_rule_chunked(q, k, v, initial_state=None, output_final_state=False, chunk_size=CHUNK):
    o, final = _SumChunked.apply(q, k, v, initial_state, chunk_size)
    return o, (final if output_final_state else None)
