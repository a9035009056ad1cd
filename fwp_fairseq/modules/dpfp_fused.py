"""DPFP features with their sum normalisation as one autograd function (forward and a hand-written
backward), so that a training step does not build the concatenations, rolled copies and
per-op gradient buffers the composed formula leaves to autograd.

With r = relu([x, -x]) (2D entries) and j = 1..nu, DPFP's features are p_j[i] = r[i] r[i - j]
(indices mod 2D), phi = p / (sum p + eps). Backward, from the output gradient g:
    dp = (g - <g, phi>) / (sum p + eps)
    dr[m] = sum_j dp_j[m] r[m - j] + dp_j[m + j] r[m + j]
    dx = dr[:D] [x > 0] - dr[D:] [x < 0]
Each shifted product is written as two slice products (the wrap-around part is j columns)
straight into the output, so no rolled copy of r is made."""
import torch

from .precision import to_accumulation


def _shifted(op, a, b, j, out):
    """out[..., i] = op(a[..., i], b[..., i - j]) for every i (indices mod the last size):
    two slice ops, no rolled copy of b."""
    n = a.size(-1)
    op(a[..., j:], b[..., :n - j], out=out[..., j:])
    op(a[..., :j], b[..., n - j:], out=out[..., :j])


def _relu_pm(xa):
    """r = relu([x, -x]) in one new tensor."""
    d = xa.size(-1)
    r = xa.new_empty(*xa.shape[:-1], 2 * d)
    torch.clamp(xa, min=0, out=r[..., :d])
    torch.clamp(xa, max=0, out=r[..., d:]).neg_()
    return r


def _products(r, nu):
    """p (..., nu * 2D): p_j = r * roll(r, j), j = 1..nu."""
    n = r.size(-1)
    p = r.new_empty(*r.shape[:-1], nu * n)
    for j in range(1, nu + 1):
        _shifted(torch.mul, r, r, j, p[..., (j - 1) * n: j * n])
    return p


class _DPFPSumNormalised(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nu, eps):
        r = _relu_pm(to_accumulation(x))
        p = _products(r, nu)
        denom = p.sum(-1, keepdim=True).add_(eps)
        phi = p.div_(denom)
        ctx.nu = nu
        ctx.save_for_backward(r, phi, denom)
        return phi.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        r, phi, denom = ctx.saved_tensors
        ga = g.to(phi.dtype)
        inv = denom.reciprocal()
        dp = torch.addcmul((ga * phi).sum(-1, keepdim=True).mul_(-inv), ga, inv)  # one pass over g
        n = r.size(-1)
        dr = torch.empty_like(r)
        for j in range(1, ctx.nu + 1):
            dpj = dp[..., (j - 1) * n: j * n]
            if j == 1:  # dr[m] = dp_j[m] r[m - j] ...
                _shifted(torch.mul, dpj, r, j, dr)
            else:
                dr[..., j:].addcmul_(dpj[..., j:], r[..., :n - j])
                dr[..., :j].addcmul_(dpj[..., :j], r[..., n - j:])
            dr[..., :n - j].addcmul_(dpj[..., j:], r[..., j:])  # ... + dp_j[m + j] r[m + j]
            dr[..., n - j:].addcmul_(dpj[..., :j], r[..., :j])
        # relu's gradient: sign(r) is 1 where r > 0, i.e. x > 0 in r[:D] and x < 0 in r[D:], and
        # 0 elsewhere (at 0 too, as autograd's relu); a multiply is far cheaper than masked_fill.
        dr.mul_(r.sign())
        d = n // 2
        return (dr[..., :d] - dr[..., d:]).to(g.dtype), None, None


def dpfp_sum_normalised(x, nu, eps):
    """phi(x) / (sum phi(x) + eps) for DPFP of order nu, x (..., D) -> (..., 2 D nu), computed in
    fp32 for half inputs and returned in x's dtype."""
    if not 1 <= nu < 2 * x.size(-1):
        raise ValueError(f"nu: the fused DPFP needs 1 <= nu < 2 * head_dim = {2 * x.size(-1)}, got {nu}")
    return _DPFPSumNormalised.apply(x, nu, eps)
