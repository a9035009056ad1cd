"""The attention normaliser of causal attention (modules/normaliser.py): the running key sums
against a loop, and the normalised (gated) delta rule in fp32 as close to fp64 as without the
gate (its old z_t - phi(k_t) cancelled)."""
import copy

import pytest
import torch

pytest.importorskip("fairseq")
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from fwp_fairseq.modules.normaliser import key_sums  # noqa: E402
from helpers import rel_err  # noqa: E402


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("carried", [False, True])
def test_key_sums_match_a_loop(gated, carried):
    gen = torch.Generator().manual_seed(0)
    k = torch.rand(2, 3, 70, 4, generator=gen, dtype=torch.float64)  # > one chunk of decayed_cumsum
    g = -3 * torch.rand(2, 3, 70, generator=gen, dtype=torch.float64) if gated else None
    z0 = torch.rand(2, 3, 1, 4, generator=gen, dtype=torch.float64) if carried else None
    z = torch.zeros(2, 3, 4, dtype=torch.float64) if z0 is None else z0[:, :, 0]
    zs, before = [], []
    for t in range(70):
        z = z * (g[:, :, t, None].exp() if gated else 1.0)
        before.append(z)
        z = z + k[:, :, t]
        zs.append(z)
    got, got_before = key_sums(k, g, z0)
    assert rel_err(got, torch.stack(zs, 2)) < 1e-12 and rel_err(got_before, torch.stack(before, 2)) < 1e-12


def _strong_gate(att, seed=0):
    """Input-dependent decays down to exp(-20): the decayed sum z_{t-1} is often tiny beside
    phi(k_t), where z_t - phi(k_t) lost its digits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        att.gate.proj.weight.copy_(torch.randn(att.gate.proj.weight.shape, generator=g))
        att.gate.a_log.copy_(torch.randn(att.gate.a_log.shape, generator=g) * 0.5)


@pytest.mark.parametrize("fmap", ["linear", "dpfp"])
@pytest.mark.parametrize("gate", ["none", "scalar"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_normalised_delta_rule_fp32_is_as_close_to_fp64_with_the_gate(fmap, gate, impl):
    """The layer in fp32 against its fp64 copy, T = 200. fp32 round-off of the (contractive)
    normalised recurrence is ~sqrt(T) eps32 ~ 1e-6 of the output's scale (measured 2e-7 to
    6e-7, gated or not, both impls); 1e-5 allows 15x that. Before key_sums the gated DPFP layer
    was 2.3e-4 off (linear: 9e-6) and the ungated DPFP one 2.4e-6."""
    torch.manual_seed(0)
    att = FastWeightAttention(32, 2, self_attention=True, causal=True, feature_map=fmap, update="delta",
                              attn_normalize=True, gate=gate, impl=impl).eval()
    if gate == "scalar":
        _strong_gate(att)
    att64 = copy.deepcopy(att).double()
    x = torch.randn(200, 3, 32)
    with torch.no_grad():
        got = att(x, x, x)[0]
        want = att64(x.double(), x.double(), x.double())[0]
    assert rel_err(got, want) < 1e-5
