"""Step-by-step sum rule: the oracle every fast path is tested against.

S_t = S_{t-1} + k_t v_t^T ;  o_t = S_t^T q_t  (read after write)."""
import torch

from .._checks import accumulation_dtype


def sum_rule_reference(q, k, v, initial_state=None, output_final_state=False):
    acc = accumulation_dtype(q.dtype)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if initial_state is None:
        S = q.new_zeros(B, H, Dk, Dv, dtype=acc)
    else:
        S = initial_state.to(acc)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    outs = []
    for t in range(T):
        S = S + ka[:, :, t, :, None] * va[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qa[:, :, t], S))
    o = torch.stack(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)
