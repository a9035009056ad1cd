"""Step-by-step sum rule: the oracle every fast path is tested against.

S_t = a_t S_{t-1} + k_t v_t^T ;  o_t = S_t^T q_t  (read after write), with the decay
a_t = exp(g_t) when a log-decay g (B, H, T) is given (decayed linear attention, as in RetNet
and Mamba-2), a_t = 1 without."""
import torch

from .._checks import accumulation_dtype, start_state


def sum_rule_reference(q, k, v, initial_state=None, output_final_state=False, g=None):
    acc = accumulation_dtype(q.dtype)
    S = start_state(q, v, initial_state)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    decay = None if g is None else g.to(acc).exp()
    outs = []
    for t in range(q.shape[2]):
        if decay is not None:
            S = decay[:, :, t, None, None] * S
        S = S + ka[:, :, t, :, None] * va[:, :, t, None, :]
        outs.append(qa[:, :, t, None] @ S)  # (B, H, 1, Dv): a matmul, cheaper than einsum per step
    o = torch.cat(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)
