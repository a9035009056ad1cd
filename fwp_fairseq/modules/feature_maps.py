"""Feature maps phi for keys and queries (arXiv 2102.11174, section 5), their normalisation
(sum, as in the paper, or L2), and which normalisations a (feature map, update rule) pair gets.

Each map is a FeatureMap (an nn.Module) with ``out_dim`` and forward(x: (..., head_dim)) ->
(..., out_dim); FEATURE_MAPS names them. No fairseq import: usable from plain PyTorch."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dpfp_fused import dpfp_sum_normalised
from .precision import to_accumulation


def sum_normalize(x, eps=1e-6):
    """phi / sum_j phi_j. Features are non-negative; eps keeps an all-zero vector at zero, not NaN.
    Computed in fp32 for half inputs (a sum of many half features overflows fp16)."""
    xa = to_accumulation(x)
    return (xa / (xa.sum(-1, keepdim=True) + eps)).to(x.dtype)


def l2_normalize(x, eps=1e-6):
    """phi / |phi|_2 (in fp32 for half inputs). With |k| = 1 a delta-rule write with beta = 1
    replaces what the memory held for k; after sum normalisation |k|^2 is only ~1/d_dot for
    spread-out features, so each write corrects a small fraction of the error along k (on
    random keys a carried state then drifts for tens of thousands of steps, with L2 it settles
    within ~2k: experiments/carried_state/delta_state_settling.py; learned keys drift either way)."""
    xa = to_accumulation(x)
    return (xa / xa.norm(dim=-1, keepdim=True).clamp_min(eps)).to(x.dtype)  # exactly unit length


PHI_NORMS = {"sum": sum_normalize, "l2": l2_normalize}


class FeatureMap(nn.Module):
    """What the normalisation defaults need to know about a map (resolve_normalisation)."""
    signed = False  # features can be negative: a sum of them can be zero
    needs_normalisation = False  # defined only up to a positive per-vector factor
    sum_normalised = False  # the paper sum-normalises it even with the sum rule

    def normalised(self, x, phi_norm, eps):
        """phi(x) normalised by PHI_NORMS[phi_norm] (None: as it is)."""
        x = self(x)
        return x if phi_norm is None else PHI_NORMS[phi_norm](x, eps)


class LinearFeatureMap(FeatureMap):
    """Katharopoulos et al.: phi(x) = elu(x) + 1, d_dot = head_dim."""

    def __init__(self, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.out_dim = head_dim

    def forward(self, x):
        return F.elu(x) + 1.0


class IdentityFeatureMap(FeatureMap):
    """phi(x) = x, d_dot = head_dim: signed features (no sum normalisation, no attention
    normaliser). With L2 normalisation this is the Delta Net as flash-linear-attention's
    DeltaNet layer builds it (Yang et al. 2024, with identity for their SiLU); not in the paper."""
    signed = True

    def __init__(self, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.out_dim = head_dim

    def forward(self, x):
        return x


class SiLUFeatureMap(IdentityFeatureMap):
    """phi(x) = SiLU(x) = x sigmoid(x), d_dot = head_dim: signed (down to -0.28), so the rules of
    identity hold (no sum normalisation, no attention normaliser); with L2 normalisation it is
    flash-linear-attention's default DeltaNet feature map (Yang et al. 2024); not in the paper.
    After --fwp-short-conv, whose output already went through SiLU, use identity instead."""

    def forward(self, x):
        return F.silu(x)


class DPFPFeatureMap(FeatureMap):
    """Deterministic parameter-free projection of order nu: r = relu([x, -x]),
    phi = concat_{j=1..nu} r * roll(r, j); d_dot = 2 * head_dim * nu."""
    sum_normalised = True

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
        r = to_accumulation(F.relu(torch.cat([x, -x], dim=-1)))
        out = torch.cat([r * r.roll(shifts=j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)
        return out.to(x.dtype)

    def normalised(self, x, phi_norm, eps):
        # Sum-normalised (the paper's DPFP): one fused autograd function, equal to the formula
        # above followed by sum_normalize but without its intermediates (dpfp_fused.py).
        # (nu >= 2 D would shift by a full turn or more: left to the formula's roll.)
        if phi_norm == "sum" and self.nu < 2 * self.head_dim:
            return dpfp_sum_normalised(x, self.nu, eps)
        return super().normalised(x, phi_norm, eps)


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


class FavorFeatureMap(FeatureMap):
    """FAVOR+ positive random features: phi(x) = exp(-|x|^2/2) / sqrt(2m) [exp(Rx), exp(-Rx)],
    d_dot = 2m. The projection R is a buffer drawn from (seed, draw index): redraw(n) makes
    every distributed worker draw the same R for the same update number n."""
    needs_normalisation = True  # forward subtracts a per-vector max before exp
    sum_normalised = True

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
        xa = to_accumulation(x)
        proj = xa @ self.projection.to(xa.dtype).T
        sq = 0.5 * (xa * xa).sum(-1, keepdim=True)
        # Subtract a per-vector max before exp for stability; sum normalisation cancels it, and
        # the attention normaliser does too (the same factor multiplies numerator and denominator).
        logits = torch.cat([proj - sq, -proj - sq], dim=-1)
        logits = logits - logits.amax(-1, keepdim=True).detach()
        return (torch.exp(logits) / math.sqrt(2 * self.num_features)).to(x.dtype)


FEATURE_MAPS = {"linear": LinearFeatureMap, "performer": FavorFeatureMap, "dpfp": DPFPFeatureMap,
                "identity": IdentityFeatureMap, "silu": SiLUFeatureMap}


def build_feature_map(name, head_dim, nu, num_features, seed):
    """The map FEATURE_MAPS[name]; nu is DPFP's order, num_features and seed FAVOR+'s."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"name: expected one of {tuple(FEATURE_MAPS)}, got {name!r}")
    if name == "dpfp":
        return DPFPFeatureMap(head_dim, nu)
    if name == "performer":
        return FavorFeatureMap(head_dim, num_features, seed)
    return FEATURE_MAPS[name](head_dim)


# How resolve_normalisation's errors name its arguments; the --fwp-* options pass their flags.
ARGUMENT_NAMES = {"attn_normalize": "attn_normalize", "sum_norm": "sum_norm", "no_sum_norm": "sum_norm",
                  "l2_norm": "l2_norm"}


def resolve_normalisation(feature_map, update, attn_normalize=None, sum_norm=None, l2_norm=False,
                          names=ARGUMENT_NAMES):
    """The normalisations of one fast-weight attention -> (attn_normalize, phi_norm), phi_norm
    "sum", "l2" or None. None (attn_normalize, sum_norm) takes the default:
    - the attention normaliser z . phi(q) (arXiv 2102.11174, section 3) is on for the sum rule
      and off for the delta rule (the paper's best Delta Net has none);
    - phi is sum-normalised with the delta rule (without it the paper's delta models diverged)
      and for DPFP and FAVOR+; l2_norm (not in the paper) replaces sum normalisation;
    - signed features (identity) get neither sum normalisation nor the normaliser: a sum of
      them can be zero; FAVOR+ features must be normalised one way or the other.
    A contradiction is a ValueError naming the argument as `names` spells it. A name outside
    FEATURE_MAPS (the --fwp-kernel softmax baseline) checks what holds for every map."""
    fmap = FEATURE_MAPS.get(feature_map, FeatureMap)
    if sum_norm and l2_norm:
        raise ValueError(f"{names['sum_norm']} and {names['l2_norm']} contradict each other: phi is "
                         "normalised one way, pick one")
    if fmap.signed and sum_norm:
        raise ValueError(f"{names['sum_norm']}: {feature_map} features are signed and can sum to zero; "
                         f"use {names['l2_norm']}")
    if fmap.signed and attn_normalize:
        raise ValueError(f"{names['attn_normalize']}: {feature_map} features are signed, the normaliser "
                         "z . phi(q) can be zero; turn it off")
    if sum_norm is None:
        sum_norm = not (l2_norm or fmap.signed) and (update == "delta" or fmap.sum_normalised)
    if fmap.needs_normalisation and not (sum_norm or l2_norm):
        raise ValueError(f"{names['no_sum_norm']}: {feature_map} features must be normalised (sum, or "
                         f"{names['l2_norm']}): they are only defined up to a per-vector factor")
    if attn_normalize is None:
        attn_normalize = update == "sum" and not fmap.signed
    phi_norm = "l2" if l2_norm else ("sum" if sum_norm else None)
    return bool(attn_normalize), phi_norm
