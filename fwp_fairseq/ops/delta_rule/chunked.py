"""Chunkwise-parallel delta rule (WY/UT form of Yang et al. 2024). Placeholder: autograd version."""
import torch

from .._checks import accumulation_dtype
from .._chunking import from_chunks, pick_chunk_size, to_chunks

CHUNK = 64


def delta_rule_chunked(q, k, v, beta, initial_state=None, output_final_state=False, chunk_size=CHUNK):
    acc = accumulation_dtype(q.dtype)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = pick_chunk_size(T, chunk_size)
    Q, K, V = (to_chunks(x.to(acc), C) for x in (q, k, v))
    Bt = to_chunks(beta.to(acc)[..., None], C)
    Kb, Vb = K * Bt, V * Bt
    A = (Kb @ K.transpose(-1, -2)).tril(-1)
    eye = torch.eye(C, dtype=acc, device=q.device)
    sol = torch.linalg.solve_triangular(eye + A, torch.cat([Kb, Vb], -1), upper=False, unitriangular=True)
    W, Ut = sol[..., :Dk], sol[..., Dk:]
    P = (Q @ K.transpose(-1, -2)).tril()
    S = q.new_zeros(B * H, Dk, Dv, dtype=acc) if initial_state is None else initial_state.to(acc).reshape(B * H, Dk, Dv)
    outs = []
    for n in range(Q.shape[1]):
        U = Ut[:, n] - W[:, n] @ S
        outs.append(Q[:, n] @ S + P[:, n] @ U)
        S = S + K[:, n].transpose(-1, -2) @ U
    o = from_chunks(torch.stack(outs, 1), B, H, T).to(q.dtype)
    return o, (S.reshape(B, H, Dk, Dv) if output_final_state else None)
