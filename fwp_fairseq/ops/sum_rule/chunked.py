"""Chunkwise-parallel sum rule.

Inside a chunk the output is a causal (masked) product tril(Q K^T) V; across chunks the state
before chunk n is the initial state plus the exclusive prefix sum of the chunks' K_n^T V_n.
Everything is batched over all chunks at once: no Python loop over time, memory linear in T."""
import torch

from .._checks import accumulation_dtype
from .._chunking import from_chunks, pick_chunk_size, to_chunks

CHUNK = 64


def sum_rule_chunked(q, k, v, initial_state=None, output_final_state=False, chunk_size=CHUNK):
    acc = accumulation_dtype(q.dtype)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = pick_chunk_size(T, chunk_size)
    Q, K, V = (to_chunks(x.to(acc), C) for x in (q, k, v))  # (BH, N, C, D)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (Q @ K.transpose(-1, -2)).masked_fill_(~mask, 0.0)  # read after write: diagonal kept
    o = scores @ V
    kv = K.transpose(-1, -2) @ V  # (BH, N, Dk, Dv): what each chunk writes
    states = torch.cumsum(kv, dim=1)  # state after each chunk (without initial)
    before = torch.cat([states.new_zeros(B * H, 1, Dk, Dv), states[:, :-1]], dim=1)
    if initial_state is not None:
        init = initial_state.to(acc).reshape(B * H, 1, Dk, Dv)
        before = before + init
    o = o + Q @ before
    out = from_chunks(o, B, H, T).to(q.dtype)
    final = None
    if output_final_state:
        final = states[:, -1].reshape(B, H, Dk, Dv)
        if initial_state is not None:
            final = final + initial_state.to(acc)
    return out, final
