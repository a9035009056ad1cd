"""Chunkwise-parallel sum rule, with a hand-written backward.

Inside chunk n the output is a causal (masked) product tril(Q_n K_n^T) V_n; across chunks the
state before chunk n is S_0 + sum_{m<n} K_m^T V_m. All products are batched over every chunk at
once; only the running sums of the (Dk x Dv) chunk states are a loop. Memory is linear in T.

With a log-decay g (S_t = a_t S_{t-1} + k_t v_t^T, a_t = exp(g_t)), the same products carry the
decays of _chunking.ChunkDecay: the causal mask becomes exp(b_t - b_s), the state read at step t
is decayed by exp(b_t), the write of step t by exp(b_C - b_t) and the carried state by exp(b_C):
    O = diag(exp(b)) Q S + (tril(Q K^T) * exp(b_t - b_s)) V
    S_next = exp(b_C) S + (diag(exp(b_C - b)) K)^T V"""
import torch

from .._checks import accumulation_dtype, start_state
from .._chunking import (CHUNK, ChunkDecay, acc_bmm, bmm, chunk_decay, decay_grad, from_chunks, pick_chunk_size,
                         to_chunks)


def _forward_gated(Q, K, V, S0, dec):
    """Returns O, the states before each chunk then the final state (N + 1, BH, Dk, Dv), and P."""
    N, BH, C, Dk = K.shape
    P = bmm(Q, K.transpose(-1, -2)).mul_(dec.pair)
    states = K.new_empty(N + 1, BH, Dk, V.shape[-1])
    states[0] = S0
    # per chunk, not batched: a (T x Dk) temporary for the decayed keys costs more than the loop
    for n in range(N):
        torch.mul(states[n], dec.whole[n], out=states[n + 1]).baddbmm_(
            (K[n] * dec.until_end[n]).transpose(-1, -2), V[n])
    O = acc_bmm(bmm(Q, states[:N]).mul_(dec.since_start), P, V)
    return O, states, P


def _backward_gated(Q, K, V, dec, P, states, dO, dSf, need_dg):
    N = Q.shape[0]
    grads = torch.empty_like(states)  # grads[n]: w.r.t. states[n]; grads[N] w.r.t. the final state
    grads[N] = dSf
    for n in range(N - 1, -1, -1):  # the carried gradient decays; each chunk's read adds to it
        torch.mul(grads[n + 1], dec.whole[n], out=grads[n]).baddbmm_(
            Q[n].transpose(-1, -2), dO[n] * dec.since_start[n])
    after, d_after = states[1:], grads[1:]
    dP = bmm(dO, V.transpose(-1, -2)).mul_(dec.pair)
    dQ = acc_bmm(bmm(dO, states[:N].transpose(-1, -2)).mul_(dec.since_start), dP, K)
    dK = acc_bmm(bmm(V, d_after.transpose(-1, -2)).mul_(dec.until_end), dP.transpose(-1, -2), Q)
    dV = acc_bmm(bmm(K, d_after).mul_(dec.until_end), P.transpose(-1, -2), dO)
    return dQ, dK, dV, grads[0], (decay_grad(Q, dQ, V, dV, after, d_after) if need_dg else None)


def _forward(Q, K, V, S0):
    N = Q.shape[0]
    P = bmm(Q, K.transpose(-1, -2)).tril_()  # read after write: the diagonal is kept
    states = bmm(K.transpose(-1, -2), V)  # what each chunk writes, turned in place into
    S = S0                                # the state before each chunk
    for n in range(N):
        S, states[n] = S + states[n], S
    O = acc_bmm(bmm(Q, states), P, V)
    return O, S, P, states


def _backward(Q, K, V, P, states, dO, dSf):
    # Chunk n's write reaches every later read and the final state: a suffix sum, in place.
    d_kv = bmm(Q.transpose(-1, -2), dO)  # gradient w.r.t. the state each chunk reads
    dS = dSf
    for n in range(Q.shape[0] - 1, -1, -1):
        dS, d_kv[n] = dS + d_kv[n], dS
    dP = bmm(dO, V.transpose(-1, -2)).tril_()
    dQ = acc_bmm(bmm(dP, K), dO, states.transpose(-1, -2))
    dK = acc_bmm(bmm(dP.transpose(-1, -2), Q), V, d_kv.transpose(-1, -2))
    dV = acc_bmm(bmm(P.transpose(-1, -2), dO), K, d_kv)
    return dQ, dK, dV, dS


class _SumChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, chunk_size, g):
        acc = accumulation_dtype(q.dtype)
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        C = pick_chunk_size(T, chunk_size)
        Q, K, V = (to_chunks(x.to(acc), C) for x in (q, k, v))  # (N, BH, C, D)
        S0 = start_state(q, v, initial_state, flat=True)
        if g is None:
            O, S, P, states = _forward(Q, K, V, S0)
            ctx.save_for_backward(Q, K, V, P, states)
        else:
            dec = chunk_decay(to_chunks(g.to(acc)[..., None], C))
            O, states, P = _forward_gated(Q, K, V, S0, dec)
            S = states[-1].clone()  # owned: a view would keep every chunk's state alive
            ctx.save_for_backward(Q, K, V, P, states, *dec)
        ctx.meta = (B, H, T, q.dtype, None if initial_state is None else initial_state.dtype,
                    None if g is None else g.dtype)
        return from_chunks(O, B, H, T).to(q.dtype), S.reshape(B, H, Dk, Dv)

    @staticmethod
    def backward(ctx, do, dsf):
        Q, K, V, P, states, *dec = ctx.saved_tensors
        B, H, T, in_dtype, state_dtype, g_dtype = ctx.meta
        C, Dk, Dv = Q.shape[2], K.shape[-1], V.shape[-1]
        dO = to_chunks(do.to(Q.dtype), C)
        dSf = Q.new_zeros(B * H, Dk, Dv) if dsf is None else dsf.to(Q.dtype).reshape(B * H, Dk, Dv)
        dg = None
        if g_dtype is None:
            dQ, dK, dV, dS0 = _backward(Q, K, V, P, states, dO, dSf)
        else:
            dQ, dK, dV, dS0, dG = _backward_gated(Q, K, V, ChunkDecay(*dec), P, states, dO, dSf,
                                                  ctx.needs_input_grad[5])
            dg = None if dG is None else from_chunks(dG, B, H, T)[..., 0].to(g_dtype)
        dq, dk, dv = (from_chunks(x, B, H, T).to(in_dtype) for x in (dQ, dK, dV))
        ds0 = None if state_dtype is None else dS0.reshape(B, H, Dk, Dv).to(state_dtype)
        return dq, dk, dv, ds0, None, dg


def sum_rule_chunked(q, k, v, initial_state=None, output_final_state=False, chunk_size=CHUNK, g=None):
    o, final = _SumChunked.apply(q, k, v, initial_state, chunk_size, g)
    return o, (final if output_final_state else None)
