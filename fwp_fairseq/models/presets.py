"""Flag sets for whole published layers, applied by the preset architectures of fwp_lm and
fwp_transformer (each flag can still be given on the command line, which wins).

Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025; flash-linear-attention's GatedDeltaNet
layer): q, k, v each through a short causal convolution of kernel 4 and SiLU, L2-normalised q
and k (phi is the identity: the SiLU is the convolution's, applied once as in the published
layer), the delta rule with beta in (0, 2) (allow_neg_eigval) under a scalar forget gate, and a
per-head RMS norm of the read-out gated by SiLU(W_g x) before the output projection."""

GATED_DELTANET = {"fwp_kernel": "identity", "fwp_l2_normalize": True, "fwp_update": "delta",
                  "fwp_short_conv": 4, "fwp_gate": "scalar", "fwp_beta_range": "double",
                  "fwp_output_norm": "rms-gated"}


def gated_deltanet_flags():
    """GATED_DELTANET as command-line flags (for run scripts and docs)."""
    out = []
    for name, value in GATED_DELTANET.items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out
