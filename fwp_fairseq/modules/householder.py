"""DeltaProduct in the attention layer (--fwp-householder N; Siems et al. 2025, "DeltaProduct:
Improving State-Tracking in Linear RNNs via Householder Products"; not in arXiv 2102.11174).

Each token writes N times: write 0 uses the layer's own k_proj, v_proj and beta_proj (so N = 1
is the delta rule with no new parameters and old checkpoints unchanged), writes 1..N-1 use the
projections held here. The ops (fast_weight_delta_product) take the writes interleaved, write j
of token t at index t*N + j.

With --fwp-short-conv K the keys and values of writes 1..N-1 go through a causal short
convolution of their own (kernel K, then SiLU; state-dict key extra_writes.short_conv.weight),
as write 0's do through the layer's: flash-linear-attention's GatedDeltaProduct convolves the
keys and values of all N writes (not the betas). Its tail of K-1 inputs is kept by the layer
beside the layer's own (decoding: "extra_conv_tail"; the carried state)."""
import torch
import torch.nn as nn

from .short_conv import ShortConvolution


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
    """The key, value and beta projections of writes 1..N-1 of every token, and with short_conv
    K > 0 the causal convolution of those keys and values (0: none, no parameter).
    x (T, B, C) -> k, v (B, H, T, N-1, head_dim) before the feature map, beta logits (B, H, T, N-1),
    and the convolution's new tail (B, 2 (N-1) C, K-1) (None without it)."""

    def __init__(self, embed_dim, num_heads, num_householder, short_conv=0):
        super().__init__()
        self.extra, self.num_heads = num_householder - 1, num_heads
        self.k_proj = nn.Linear(embed_dim, self.extra * embed_dim)
        self.v_proj = nn.Linear(embed_dim, self.extra * embed_dim)
        self.beta_proj = nn.Linear(embed_dim, self.extra * num_heads, bias=False)
        # Depthwise over the keys' and values' 2 (N-1) C channels at once, as the layer's over q, k, v.
        self.short_conv = ShortConvolution(2 * self.extra * embed_dim, short_conv) if short_conv else None

    def reset_parameters(self, gain):
        """As the layer's own k, v and beta projections."""
        for proj in (self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
            nn.init.constant_(proj.bias, 0.0)
        nn.init.xavier_uniform_(self.beta_proj.weight)

    def forward(self, x, tail=None, padding_mask=None):
        """tail: the convolution's last K-1 inputs before x (None: zeros); padding_mask (B, T),
        True at padding: the convolution counts those inputs as zero."""
        T, B, _ = x.shape

        def heads(y):  # (T, B, (N-1) H D) -> (B, H, T, N-1, D)
            return y.reshape(T, B, self.extra, self.num_heads, -1).permute(1, 3, 0, 2, 4)

        logits = self.beta_proj(x).view(T, B, self.extra, self.num_heads).permute(1, 3, 0, 2)
        if self.short_conv is None:
            return heads(self.k_proj(x)), heads(self.v_proj(x)), logits, None
        (k, v), tail = self.short_conv([self.k_proj(x), self.v_proj(x)], tail, padding_mask)
        return heads(k), heads(v), logits, tail

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint of --fwp-householder N with --fwp-short-conv K from before the extra
        writes had their convolution lacks its weight: say why, besides torch's missing key."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        conv = prefix + "short_conv."
        if (strict and self.short_conv is not None and prefix + "k_proj.weight" in state_dict
                and not any(k.startswith(conv) for k in state_dict)):
            error_msgs.append(
                f"{conv}*: missing; this checkpoint was trained with --fwp-householder {self.extra + 1} and "
                f"--fwp-short-conv {self.short_conv.kernel} by a version of fwp_fairseq that left the keys and "
                "values of DeltaProduct's extra writes unconvolved; this version convolves them (as "
                "flash-linear-attention's GatedDeltaProduct), so the checkpoint is another model: retrain it, "
                "or score it with the version that trained it")


def interleave(first, extra):
    """first (B, H, T, ...) and extra (B, H, T, N-1, ...) -> (B, H, T*N, ...): write 0 of token t
    at t*N, write j at t*N + j."""
    B, H, T = first.shape[:3]
    both = torch.cat([first.unsqueeze(3), extra.to(first.dtype)], dim=3)
    return both.reshape(B, H, T * both.size(3), *first.shape[3:])
