"""Shared inputs for the ops tests: sum-normalised keys/queries (as the models use them) keep the
delta rule contractive, so fp32 comparisons measure the algorithm, not an exploding recurrence."""
import torch


def make_inputs(B, H, T, Dk, Dv, dtype=torch.float64, seed=0, with_state=False, requires_grad=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = rnd(B, H, T, Dk).softmax(-1)
    k = rnd(B, H, T, Dk).softmax(-1)
    v = rnd(B, H, T, Dv)
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    state = rnd(B, H, Dk, Dv) if with_state else None
    out = [q, k, v, beta, state]
    out = [None if x is None else x.to(dtype).requires_grad_(requires_grad) for x in out]
    return out


def positive_inputs(B, H, T, Dk, Dv, dtype=torch.float32, device="cpu", seed=0):
    """[q, k, v, beta, h0] with sum-normalised positive features, as the models feed them (the
    CUDA tests' inputs: the delta rule stays stable in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, T, Dk, generator=g, dtype=torch.float64) + 0.1
    k = torch.rand(B, H, T, Dk, generator=g, dtype=torch.float64) + 0.1
    q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    h0 = 0.5 * torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, beta, h0)]


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_with_grads(fn, q, k, v, beta, state, impl, seed=123):
    """Outputs, final state and the gradients of a random linear function of both."""
    args = (q, k, v) if beta is None else (q, k, v, beta)
    o, S = fn(*args, initial_state=state, output_final_state=True, impl=impl)
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    inputs = [x for x in (*args, state) if x is not None]
    grads = torch.autograd.grad((o * wo).sum() + (S * ws).sum(), inputs)
    return [o, S, *grads]
