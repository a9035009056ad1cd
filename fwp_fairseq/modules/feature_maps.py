"""Feature maps phi for keys and queries (../shared/PAPER.md section 3), and their normalisation
(sum, as in the paper, or L2).

Each map is an nn.Module with ``out_dim`` and forward(x: (..., head_dim)) -> (..., out_dim).
No fairseq import: usable from plain PyTorch."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sum_normalize(x, eps=1e-6):
    """phi / sum_j phi_j. Features are non-negative; eps keeps an all-zero vector at zero, not NaN.
    Computed in fp32 for half inputs (a sum of many half features overflows fp16)."""
    xa = _acc(x)
    return (xa / (xa.sum(-1, keepdim=True) + eps)).to(x.dtype)


def l2_normalize(x, eps=1e-6):
    """phi / |phi|_2 (in fp32 for half inputs). With |k| = 1 a delta-rule write with beta = 1
    replaces what the memory held for k; after sum normalisation |k|^2 is only ~1/d_dot for
    spread-out features, so each write corrects a small fraction of the error along k (on
    random keys a carried state then drifts for tens of thousands of steps, with L2 it settles
    within ~2k: benchmarks/delta_state_settling.py; learned keys drift either way)."""
    xa = _acc(x)
    return (xa / xa.norm(dim=-1, keepdim=True).clamp_min(eps)).to(x.dtype)  # exactly unit length


def _acc(x):
    """fp32 for half inputs (fp64 stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class LinearFeatureMap(nn.Module):
    """Katharopoulos et al.: phi(x) = elu(x) + 1, d_dot = head_dim."""

    def __init__(self, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.out_dim = head_dim

    def forward(self, x):
        return F.elu(x) + 1.0


class IdentityFeatureMap(nn.Module):
    """phi(x) = x, d_dot = head_dim: signed features (no sum normalisation, no attention
    normaliser). With L2 normalisation this is the Delta Net as flash-linear-attention's
    DeltaNet layer builds it (Yang et al. 2024, with identity for their SiLU); not in the paper."""

    def __init__(self, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.out_dim = head_dim

    def forward(self, x):
        return x


class DPFPFeatureMap(nn.Module):
    """Deterministic parameter-free projection of order nu: r = relu([x, -x]),
    phi = concat_{j=1..nu} r * roll(r, j); d_dot = 2 * head_dim * nu."""

    def __init__(self, head_dim, nu=1):
        super().__init__()
        if nu < 1:
            raise ValueError(f"nu: DPFP order must be >= 1, got {nu}")
        self.head_dim = head_dim
        self.nu = nu
        self.out_dim = 2 * head_dim * nu

    def forward(self, x):
        # Products of two entries: computed in fp32 for half inputs (|x| ~ 1e3 would be inf in
        # fp16), then returned in x's dtype, so callers wanting range pass fp32 in.
        r = F.relu(torch.cat([x, -x], dim=-1))
        ra = _acc(r)
        out = torch.cat([ra * ra.roll(shifts=j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)
        return out.to(x.dtype)


def orthogonal_random_matrix(num_features, head_dim, generator, dtype=torch.float32):
    """num_features x head_dim rows drawn in orthogonal blocks of head_dim, with chi-distributed
    norms (so that each row is marginally Gaussian), as in Performer's FAVOR+."""
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        g = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        qmat, _ = torch.linalg.qr(g)
        blocks.append(qmat.T)
    rows = torch.cat(blocks, dim=0)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms[:, None]).to(dtype)


class FavorFeatureMap(nn.Module):
    """FAVOR+ positive random features: phi(x) = exp(-|x|^2/2) / sqrt(2m) [exp(Rx), exp(-Rx)],
    d_dot = 2m. The projection R is a buffer drawn from (seed, draw index): redraw(n) makes
    every distributed worker draw the same R for the same update number n."""

    def __init__(self, head_dim, num_features=64, seed=1):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features: FAVOR+ needs m >= 1, got {num_features}")
        self.head_dim = head_dim
        self.num_features = num_features
        self.out_dim = 2 * num_features
        self.seed = seed
        self.register_buffer("projection", self._draw(0), persistent=True)
        self.draw_index = 0

    def _draw(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return orthogonal_random_matrix(self.num_features, self.head_dim, g)

    def redraw(self, index):
        """Draw R number `index` (a deterministic function of seed and index)."""
        if index != self.draw_index:
            self.projection.copy_(self._draw(index).to(self.projection.device))
            self.draw_index = index

    def forward(self, x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xa = x.to(acc)
        proj = xa @ self.projection.to(acc).T
        sq = 0.5 * (xa * xa).sum(-1, keepdim=True)
        # Subtract a per-vector max before exp for stability; sum normalisation cancels it, and
        # the attention normaliser does too (the same factor multiplies numerator and denominator).
        logits = torch.cat([proj - sq, -proj - sq], dim=-1)
        logits = logits - logits.amax(-1, keepdim=True).detach()
        return (torch.exp(logits) / math.sqrt(2 * self.num_features)).to(x.dtype)


def build_feature_map(kind, head_dim, nu=1, num_features=64, seed=1):
    """kind: 'linear', 'dpfp', 'performer' or 'identity'."""
    if kind == "linear":
        return LinearFeatureMap(head_dim)
    if kind == "identity":
        return IdentityFeatureMap(head_dim)
    if kind == "dpfp":
        return DPFPFeatureMap(head_dim, nu)
    if kind == "performer":
        return FavorFeatureMap(head_dim, num_features, seed)
    raise ValueError(f"kind: expected one of 'linear', 'dpfp', 'performer', 'identity', got {kind!r}")
