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
so autograd never records the per-chunk loop."""
import torch

from .._checks import accumulation_dtype
from .._chunking import from_chunks, pick_chunk_size, to_chunks

CHUNK = 64


def _forward_chunks(Q, K, V, Bt, S0):
    """All tensors (N, BH, C, D) in the accumulation dtype; S0 (BH, Dk, Dv).
    Returns O, the final state, and what the backward reuses."""
    N, BH, C, Dk = K.shape
    Kt = K.transpose(-1, -2)
    Kb, Vb = K * Bt, V * Bt
    A = (Kb @ Kt).tril_(-1)
    eye = torch.eye(C, dtype=K.dtype, device=K.device)
    Tinv = torch.linalg.solve_triangular(A.add_(eye), eye.expand_as(A), upper=False, unitriangular=True)
    WUt = Tinv @ torch.cat([Kb, Vb], dim=-1)  # W and Ut in one product
    W, Ut = WUt[..., :Dk], WUt[..., Dk:]
    states = K.new_empty(N, BH, Dk, V.shape[-1])
    U = torch.empty_like(Ut)
    S = S0
    for n in range(N):
        states[n] = S
        torch.baddbmm(Ut[n], W[n], S, beta=1.0, alpha=-1.0, out=U[n])
        S = torch.baddbmm(S, Kt[n], U[n])
    P = (Q @ Kt).tril_()
    O = torch.matmul(Q, states).add_(P @ U)
    return O, S, (Kb, Tinv, W, Ut, U, P, states)


def _backward_chunks(Q, K, V, Bt, saved, dO, dS_final):
    Kb, Tinv, W, Ut, U, P, states = saved
    N, BH, C, Dk = K.shape
    Kt = K.transpose(-1, -2)
    G = P.transpose(-1, -2) @ dO  # dO's contribution to dU through the intra-chunk product
    R = Q.transpose(-1, -2) @ dO  # dO's contribution to dS through the inter-chunk read
    dU = torch.empty_like(U)
    dS_after = torch.empty_like(states)  # gradient w.r.t. the state after each chunk
    dS = dS_final
    for n in range(N - 1, -1, -1):
        dS_after[n] = dS
        torch.baddbmm(G[n], K[n], dS, out=dU[n])
        dS = torch.baddbmm(dS + R[n], W[n].transpose(-1, -2), dU[n], alpha=-1.0)
    dS0 = dS
    states_t = states.transpose(-1, -2)
    dP = (dO @ U.transpose(-1, -2)).tril_()
    dQ = torch.matmul(dO, states_t).add_(dP @ K)
    dK = (U @ dS_after.transpose(-1, -2)).add_(dP.transpose(-1, -2) @ Q)
    dW = -(dU @ states_t)
    # Through [W, Ut] = Tinv [Kb, Vb] with Tinv = (I + A)^-1, d(Tinv) = -Tinv dA Tinv gives
    # dA = -([dKb, dVb] [W, Ut]^T) where [dKb, dVb] = Tinv^T [dW, dU]: two products in all.
    dKbVb = Tinv.transpose(-1, -2) @ torch.cat([dW, dU], dim=-1)
    dKb, dVb = dKbVb[..., :Dk], dKbVb[..., Dk:]
    dA = (dKbVb @ torch.cat([W, Ut], dim=-1).transpose(-1, -2)).neg_().tril_(-1)
    # A = strictly-lower(Kb K^T)
    dKb.add_(dA @ K)
    dK.add_(dA.transpose(-1, -2) @ Kb)
    # Kb = K beta, Vb = V beta
    dK.add_(dKb * Bt)
    dV = dVb * Bt
    dBt = (dKb * K).sum(-1, keepdim=True) + (dVb * V).sum(-1, keepdim=True)
    return dQ, dK, dV, dBt, dS0


class _DeltaChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state, chunk_size):
        acc = accumulation_dtype(q.dtype)
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        C = pick_chunk_size(T, chunk_size)
        Q, K, V = (to_chunks(x.to(acc), C) for x in (q, k, v))
        Bt = to_chunks(beta.to(acc)[..., None], C)
        if initial_state is None:
            S0 = q.new_zeros(B * H, Dk, Dv, dtype=acc)
        else:
            S0 = initial_state.to(acc).reshape(B * H, Dk, Dv)
        O, S, saved = _forward_chunks(Q, K, V, Bt, S0)
        ctx.save_for_backward(Q, K, V, Bt, *saved)
        ctx.meta = (B, H, T, q.dtype, beta.dtype, None if initial_state is None else initial_state.dtype)
        return from_chunks(O, B, H, T).to(q.dtype), S.reshape(B, H, Dk, Dv)

    @staticmethod
    def backward(ctx, do, dsf):
        Q, K, V, Bt, *saved = ctx.saved_tensors
        B, H, T, in_dtype, beta_dtype, state_dtype = ctx.meta
        C = Q.shape[2]
        Dk, Dv = K.shape[-1], V.shape[-1]
        acc = Q.dtype
        dO = to_chunks(do.to(acc), C)
        dSf = Q.new_zeros(B * H, Dk, Dv) if dsf is None else dsf.to(acc).reshape(B * H, Dk, Dv).contiguous()
        dQ, dK, dV, dBt, dS0 = _backward_chunks(Q, K, V, Bt, saved, dO, dSf)
        dq, dk, dv = (from_chunks(x, B, H, T).to(in_dtype) for x in (dQ, dK, dV))
        dbeta = from_chunks(dBt, B, H, T)[..., 0].to(beta_dtype)
        ds0 = None if state_dtype is None else dS0.reshape(B, H, Dk, Dv).to(state_dtype)
        return dq, dk, dv, dbeta, ds0, None


def delta_rule_chunked(q, k, v, beta, initial_state=None, output_final_state=False, chunk_size=CHUNK):
    o, final = _DeltaChunked.apply(q, k, v, beta, initial_state, chunk_size)
    return o, (final if output_final_state else None)
