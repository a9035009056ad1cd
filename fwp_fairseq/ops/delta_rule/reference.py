"""Step-by-step delta rule: the oracle every fast path is tested against.

S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T ;  o_t = S_t^T q_t  (read after write).
With a log-decay g (B, H, T), the gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh,
ICLR 2025): the old state decays by a_t = exp(g_t) before it is read and written,
S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T."""
import torch

from .._checks import accumulation_dtype, start_state


def delta_rule_reference(q, k, v, beta, initial_state=None, output_final_state=False, g=None):
    acc = accumulation_dtype(q.dtype)
    S = start_state(q, v, initial_state)
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    decay = None if g is None else g.to(acc).exp()
    outs = []
    for t in range(q.shape[2]):
        if decay is not None:
            S = decay[:, :, t, None, None] * S
        kt = ka[:, :, t, None]  # (B, H, 1, Dk): row vectors, so that each product is a matmul
        v_old = kt @ S  # what the memory returns for this key
        u = ba[:, :, t, None, None] * (va[:, :, t, None] - v_old)
        S = S + kt.transpose(-1, -2) * u
        outs.append(qa[:, :, t, None] @ S)
    o = torch.cat(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)
