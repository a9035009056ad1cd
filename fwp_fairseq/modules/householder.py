"""DeltaProduct in the attention layer (--fwp-householder N; Siems et al. 2025, "DeltaProduct:
Improving State-Tracking in Linear RNNs via Householder Products"; not in arXiv 2102.11174).

Each token writes N times: write 0 uses the layer's own k_proj, v_proj and beta_proj (so N = 1
is the delta rule with no new parameters and old checkpoints unchanged), writes 1..N-1 use the
projections held here. The ops (fast_weight_delta_product) take the writes interleaved, write j
of token t at index t*N + j."""
import torch
import torch.nn as nn


def check_householder_options(householder, update, causal, attn_normalize):
    """The layer's checks: N >= 1; N > 1 needs the causal delta rule without the normaliser z."""
    if isinstance(householder, bool) or not isinstance(householder, int) or householder < 1:
        raise ValueError(f"householder: expected an int >= 1 (delta-rule writes per token), got {householder!r}")
    if householder == 1:
        return
    if not causal or update != "delta":
        raise ValueError(f"householder: {householder} writes per token need causal attention with the "
                         "delta rule (update='delta')")
    if attn_normalize:
        raise ValueError("householder: DeltaProduct has no attention normaliser z (attn_normalize=False)")


class ExtraWrites(nn.Module):
    """The key, value and beta projections of writes 1..N-1 of every token.
    x (T, B, C) -> k, v (B, H, T, N-1, head_dim) before the feature map, beta logits (B, H, T, N-1)."""

    def __init__(self, embed_dim, num_heads, num_householder):
        super().__init__()
        self.extra, self.num_heads = num_householder - 1, num_heads
        self.k_proj = nn.Linear(embed_dim, self.extra * embed_dim)
        self.v_proj = nn.Linear(embed_dim, self.extra * embed_dim)
        self.beta_proj = nn.Linear(embed_dim, self.extra * num_heads, bias=False)

    def reset_parameters(self, gain):
        """As the layer's own k, v and beta projections."""
        for proj in (self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
            nn.init.constant_(proj.bias, 0.0)
        nn.init.xavier_uniform_(self.beta_proj.weight)

    def forward(self, x):
        T, B, _ = x.shape

        def heads(y):  # (T, B, (N-1) H D) -> (B, H, T, N-1, D)
            return y.view(T, B, self.extra, self.num_heads, -1).permute(1, 3, 0, 2, 4)

        logits = self.beta_proj(x).view(T, B, self.extra, self.num_heads).permute(1, 3, 0, 2)
        return heads(self.k_proj(x)), heads(self.v_proj(x)), logits


def interleave(first, extra):
    """first (B, H, T, ...) and extra (B, H, T, N-1, ...) -> (B, H, T*N, ...): write 0 of token t
    at t*N, write j at t*N + j."""
    B, H, T = first.shape[:3]
    both = torch.cat([first.unsqueeze(3), extra.to(first.dtype)], dim=3)
    return both.reshape(B, H, T * both.size(3), *first.shape[3:])
