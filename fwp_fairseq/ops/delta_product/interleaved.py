"""DeltaProduct as the delta rule over the T*N writes (the fast path of every impl but reference).

A token's N writes are N consecutive steps of the gated delta rule: put the token's log-decay on
its first write (g' = 0, no decay, on the others) and its query on its last write (zero queries
elsewhere: they read nothing that is kept), run the delta rule over the T*N steps and keep the
outputs at t*N + N-1. This is exact (the same products as the step loop, in the same order within
each write) and reuses every implementation of fast_weight_delta, gradients included. Its cost is
that of the delta rule at length T*N (about N times the cost at length T): the reads at the
N-1 zero queries per token are wasted, a small part of the chunked form's work."""
import torch


def spread_queries(q, n):
    """q (B, H, T, Dk) -> (B, H, T*n, Dk): q_t at index t*n + n-1, zeros elsewhere."""
    if n == 1:
        return q
    B, H, T, Dk = q.shape
    pad = q.new_zeros(B, H, T, n - 1, Dk)
    return torch.cat([pad, q[:, :, :, None]], dim=3).reshape(B, H, T * n, Dk)


def spread_log_decays(g, n):
    """g (B, H, T) -> (B, H, T*n): g_t at index t*n (the token's first write), zeros elsewhere."""
    if g is None or n == 1:
        return g
    B, H, T = g.shape
    return torch.cat([g[..., None], g.new_zeros(B, H, T, n - 1)], dim=3).reshape(B, H, T * n)


def last_writes(o, n):
    """o (B, H, T*n, Dv) -> (B, H, T, Dv): the outputs at t*n + n-1."""
    if n == 1:
        return o
    B, H, TN, Dv = o.shape
    return o.view(B, H, TN // n, n, Dv)[:, :, :, -1]


def delta_product_interleaved(delta_fn, q, k, v, beta, num_householder, initial_state=None,
                              output_final_state=False, g=None):
    """delta_fn: fast_weight_delta with its impl bound (q, k, v, beta, initial_state,
    output_final_state, g=...) -> (o, state)."""
    n = num_householder
    gated = {} if g is None else {"g": spread_log_decays(g, n)}
    o, state = delta_fn(spread_queries(q, n), k, v, beta, initial_state, output_final_state, **gated)
    return last_writes(o, n), state
