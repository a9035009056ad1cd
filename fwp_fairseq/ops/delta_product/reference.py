"""Step-by-step DeltaProduct: the oracle every fast path of fast_weight_delta_product is tested against.

Per token t (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via
Householder Products"): the gate (if any) decays the state once, S <- a_t S with a_t = exp(g_t);
then the N delta-rule writes j = 0..N-1 of the token, in order,
    S <- S + beta_{t,j} k_{t,j} (v_{t,j} - S^T k_{t,j})^T,
(k_{t,j} at index t*N + j of k, v, beta); then the read o_t = S^T q_t. The state transition of a
token is the product of N generalised Householder matrices I - beta k k^T."""
import torch

from .._checks import accumulation_dtype, start_state


def delta_product_reference(q, k, v, beta, num_householder, initial_state=None, output_final_state=False,
                            g=None):
    acc = accumulation_dtype(q.dtype)
    S = start_state(q, v, initial_state)
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    decay = None if g is None else g.to(acc).exp()
    outs = []
    for t in range(q.shape[2]):
        if decay is not None:
            S = decay[:, :, t, None, None] * S
        for i in range(t * num_householder, (t + 1) * num_householder):
            ki = ka[:, :, i, None]  # (B, H, 1, Dk): row vectors, so that each product is a matmul
            v_old = ki @ S  # what the memory returns for this key
            u = ba[:, :, i, None, None] * (va[:, :, i, None] - v_old)
            S = S + ki.transpose(-1, -2) * u
        outs.append(qa[:, :, t, None] @ S)
    o = torch.cat(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)
