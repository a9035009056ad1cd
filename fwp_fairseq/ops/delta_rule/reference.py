"""Step-by-step delta rule: the oracle every fast path is tested against.

S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T ;  o_t = S_t^T q_t  (read after write)."""
import torch

from .._checks import accumulation_dtype


def delta_rule_reference(q, k, v, beta, initial_state=None, output_final_state=False):
    acc = accumulation_dtype(q.dtype)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if initial_state is None:
        S = q.new_zeros(B, H, Dk, Dv, dtype=acc)
    else:
        S = initial_state.to(acc)
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    outs = []
    for t in range(T):
        kt = ka[:, :, t]
        v_old = torch.einsum("bhk,bhkv->bhv", kt, S)  # what the memory returns for this key
        u = ba[:, :, t, None] * (va[:, :, t] - v_old)
        S = S + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qa[:, :, t], S))
    o = torch.stack(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)
