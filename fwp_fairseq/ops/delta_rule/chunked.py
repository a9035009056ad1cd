"""Chunkwise-parallel delta rule: the WY/UT form of Yang et al. 2024 ("Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"), with a hand-written backward.

Within a chunk of C steps starting from state S, the delta rule writes u_t = beta_t (v_t - S_{t-1}^T k_t),
so that S_t = S + sum_{i<=t} k_i u_i^T. Collecting the u_t as U gives (I + A) U = diag(beta)(V - K S)
with A = strictly-lower(diag(beta) K K^T). With Tinv = (I + A)^-1:

    U = Tinv diag(beta) V - Tinv diag(beta) K S = Ut - W S
    O = Q S + tril(Q K^T) U                      (read after write: diagonal kept)
    S_next = S + K^T U

Everything except the two small products per chunk in the S recurrence is batched over all chunks.
The backward runs the same recurrence in reverse (two products per chunk) and does the rest batched,
so autograd never records the per-chunk loop.

The gated delta rule (a log-decay g, S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,
a_t = exp(g_t)) keeps this structure with the decays of _chunking.ChunkDecay (b: the within-chunk
cumulative log-decay): u_t = beta_t (v_t - a_t S_{t-1}^T k_t), S_t = exp(b_t) S + sum_{i<=t}
exp(b_t - b_i) k_i u_i^T, so

    A = strictly-lower(diag(beta) K K^T * exp(b_t - b_i)),   W = Tinv diag(beta exp(b)) K
    O = diag(exp(b)) Q S + (tril(Q K^T) * exp(b_t - b_i)) U
    S_next = exp(b_C) S + (diag(exp(b_C - b)) K)^T U"""
import torch

from .._checks import accumulation_dtype, start_state
from .._chunking import (CHUNK, ChunkDecay, acc_bmm, bmm, chunk_decay, decay_grad, from_chunks, pick_chunk_size,
                         row_dot, to_chunks)


def _forward_chunks(Q, K, V, Bt, S0, dec=None):
    """All tensors (N, BH, C, D) in the accumulation dtype; S0 (BH, Dk, Dv); dec a ChunkDecay or
    None (ungated). Returns O, the final state, and what the backward reuses."""
    N, BH, C, Dk = K.shape
    Dv = V.shape[-1]
    Kt = K.transpose(-1, -2)
    KVb = K.new_empty(N, BH, C, Dk + Dv)  # [diag(beta) K, diag(beta) V], written in place
    Kb = torch.mul(K, Bt, out=KVb[..., :Dk])
    torch.mul(V, Bt, out=KVb[..., Dk:])
    A = bmm(Kb, Kt)
    if dec is not None:
        A.mul_(dec.pair)
        Kb.mul_(dec.since_start)  # W's keys carry the decay since the chunk's start
        Kb = None  # the gated backward works from K and beta
    A.tril_(-1)
    eye = torch.eye(C, dtype=K.dtype, device=K.device)
    Tinv = torch.linalg.solve_triangular(A.add_(eye), eye.expand_as(A), upper=False, unitriangular=True)
    WUt = bmm(Tinv, KVb)  # W and Ut in one product
    W, U = WUt[..., :Dk], WUt[..., Dk:]  # U starts as Ut and becomes Ut - W S in the loop
    states = K.new_empty(N + 1, BH, Dk, Dv)  # states[n]: before chunk n; states[N]: final
    states[0] = S0
    if dec is None:
        for n in range(N):
            U[n].baddbmm_(W[n], states[n], alpha=-1.0)
            torch.baddbmm(states[n], Kt[n], U[n], out=states[n + 1])
        P = bmm(Q, Kt).tril_()
        O = acc_bmm(bmm(Q, states[:N]), P, U)
    else:
        for n in range(N):
            U[n].baddbmm_(W[n], states[n], alpha=-1.0)
            torch.mul(states[n], dec.whole[n], out=states[n + 1]).baddbmm_(Kt[n], U[n] * dec.until_end[n])
        P = bmm(Q, Kt).mul_(dec.pair)
        O = acc_bmm(bmm(Q, states[:N]).mul_(dec.since_start), P, U)
    # The final state is returned as a copy: a view into `states` would keep every chunk's state
    # alive for as long as a carried or decoding state lives.
    return O, states[N].clone(), (Kb, Tinv, W, U, P, states)


def _backward_chunks(Q, K, V, Bt, saved, dO, dS_final, dec=None, need_dg=False):
    """The gradients w.r.t. Q, K, V, Bt, the initial state and (gated, need_dg) the log-decays."""
    Kb, Tinv, W, U, P, states = saved
    N, BH, C, Dk = K.shape
    S = states[:N]
    # grads[n + 1]: gradient w.r.t. the state after chunk n; grads[0]: w.r.t. the initial state.
    grads = torch.empty_like(states)
    grads[N] = dS_final
    G = bmm(P.transpose(-1, -2), dO)  # dO's path to dU through the intra-chunk product
    dU = G  # filled in place: dU[n] = G[n] + K[n] grads[n + 1]
    if dec is None:
        R = bmm(Q.transpose(-1, -2), dO)  # dO's path to the state read by each chunk
        for n in range(N - 1, -1, -1):
            dU[n].baddbmm_(K[n], grads[n + 1])
            torch.add(grads[n + 1], R[n], out=grads[n])
            grads[n].baddbmm_(W[n].transpose(-1, -2), dU[n], alpha=-1.0)
        dP = bmm(dO, U.transpose(-1, -2)).tril_()
        dQ = acc_bmm(bmm(dO, S.transpose(-1, -2)), dP, K)
        dK = acc_bmm(bmm(U, grads[1:].transpose(-1, -2)), dP.transpose(-1, -2), Q)
    else:
        for n in range(N - 1, -1, -1):  # decayed keys and reads per chunk: no (T x D) temporaries
            dU[n].baddbmm_(K[n] * dec.until_end[n], grads[n + 1])
            torch.mul(grads[n + 1], dec.whole[n], out=grads[n]).baddbmm_(
                Q[n].transpose(-1, -2), dO[n] * dec.since_start[n])
            grads[n].baddbmm_(W[n].transpose(-1, -2), dU[n], alpha=-1.0)
        dP = bmm(dO, U.transpose(-1, -2)).mul_(dec.pair)
        dQ = acc_bmm(bmm(dO, S.transpose(-1, -2)).mul_(dec.since_start), dP, K)
        dK = acc_bmm(bmm(U, grads[1:].transpose(-1, -2)).mul_(dec.until_end), dP.transpose(-1, -2), Q)
    # Through [W, Ut] = Tinv [Kb, Vb] and U = Ut - W S: dVb = Tinv^T dU, dKb = -dVb S^T, and
    # d(Tinv) = -Tinv dA Tinv collapses to dA = -strictly_lower(dVb U^T).
    dVb = bmm(Tinv.transpose(-1, -2), dU)
    dKb = bmm(dVb, S.transpose(-1, -2)).neg_()
    dA = bmm(dVb, U.transpose(-1, -2)).neg_()
    if dec is None:
        dA.tril_(-1)
        acc_bmm(dKb, dA, K)  # A = strictly_lower(Kb K^T)
        acc_bmm(dK, dA.transpose(-1, -2), Kb)
        dK.addcmul_(dKb, Bt)  # Kb = K beta, Vb = V beta
        dV = dVb * Bt
        dBt = (dKb * K).sum(-1, keepdim=True).add_((dVb * V).sum(-1, keepdim=True))
        return dQ, dK, dV, dBt, grads[0], None
    # W's keys are Kb exp(b); A is Kb K^T times the pair decays; dA^T Kb = (diag(beta) dA)^T K
    dKb.mul_(dec.since_start)
    dA.mul_(dec.pair).tril_(-1)
    acc_bmm(dKb, dA, K)
    acc_bmm(dK, dA.mul_(Bt).transpose(-1, -2), K)
    dK.addcmul_(dKb, Bt)
    dV = dVb * Bt
    dBt = row_dot(dKb, K).add_(row_dot(dVb, V))[..., None]
    dG = decay_grad(Q, dQ, V, dV, states[1:], grads[1:]) if need_dg else None
    return dQ, dK, dV, dBt, grads[0], dG


class _DeltaChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state, chunk_size, g):
        acc = accumulation_dtype(q.dtype)
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        C = pick_chunk_size(T, chunk_size)
        Q, K, V = (to_chunks(x.to(acc), C) for x in (q, k, v))
        Bt = to_chunks(beta.to(acc)[..., None], C)
        S0 = start_state(q, v, initial_state, flat=True)
        dec = None if g is None else chunk_decay(to_chunks(g.to(acc)[..., None], C))
        O, S, saved = _forward_chunks(Q, K, V, Bt, S0, dec)
        ctx.save_for_backward(Q, K, V, Bt, *saved, *(dec or ()))
        ctx.meta = (B, H, T, q.dtype, beta.dtype, None if initial_state is None else initial_state.dtype,
                    None if g is None else g.dtype)
        return from_chunks(O, B, H, T).to(q.dtype), S.reshape(B, H, Dk, Dv)

    @staticmethod
    def backward(ctx, do, dsf):
        Q, K, V, Bt, *saved = ctx.saved_tensors
        saved, dec = saved[:6], (ChunkDecay(*saved[6:]) if saved[6:] else None)
        B, H, T, in_dtype, beta_dtype, state_dtype, g_dtype = ctx.meta
        C = Q.shape[2]
        Dk, Dv = K.shape[-1], V.shape[-1]
        acc = Q.dtype
        dO = to_chunks(do.to(acc), C)
        dSf = Q.new_zeros(B * H, Dk, Dv) if dsf is None else dsf.to(acc).reshape(B * H, Dk, Dv).contiguous()
        dQ, dK, dV, dBt, dS0, dG = _backward_chunks(Q, K, V, Bt, saved, dO, dSf, dec, ctx.needs_input_grad[6])
        dq, dk, dv = (from_chunks(x, B, H, T).to(in_dtype) for x in (dQ, dK, dV))
        dbeta = from_chunks(dBt, B, H, T)[..., 0].to(beta_dtype)
        ds0 = None if state_dtype is None else dS0.reshape(B, H, Dk, Dv).to(state_dtype)
        dg = None if dG is None else from_chunks(dG, B, H, T)[..., 0].to(g_dtype)
        return dq, dk, dv, dbeta, ds0, None, dg


def delta_rule_chunked(q, k, v, beta, initial_state=None, output_final_state=False, chunk_size=CHUNK,
                       g=None):
    o, final = _DeltaChunked.apply(q, k, v, beta, initial_state, chunk_size, g)
    return o, (final if output_final_state else None)
