"""The fused DPFP feature map (dpfp_fused.py) against the formula it replaces, DPFPFeatureMap's
forward followed by sum_normalize: fp64 values and gradients to round-off (gradcheck too), fp32
no further from fp64 than the formula, half inputs, and the layer using it."""
import pytest
import torch

from fwp_fairseq.modules.dpfp_fused import dpfp_sum_normalised
from fwp_fairseq.modules.feature_maps import DPFPFeatureMap, sum_normalize

EPS = 1e-5


def formula(x, nu):
    return sum_normalize(DPFPFeatureMap(x.size(-1), nu)(x), EPS)


def inputs(dtype, shape=(3, 2, 7, 8), seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0, 0, 0, :3] = 0.0  # relu's kink: gradient 0 there, as autograd's relu gives
    x[0, 0, 1] = 0.0  # an all-zero row: phi = 0, no NaN
    return x.to(dtype).requires_grad_()


def value_and_grad(fn, x, g):
    y = fn(x)
    return y, torch.autograd.grad(y, x, g)[0]


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_fused_equals_formula_in_fp64(nu):
    x = inputs(torch.float64)
    g = torch.randn(*x.shape[:-1], 2 * x.size(-1) * nu, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    y, dx = value_and_grad(lambda t: dpfp_sum_normalised(t, nu, EPS), x, g)
    y_ref, dx_ref = value_and_grad(lambda t: formula(t, nu), x, g)
    torch.testing.assert_close(y, y_ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-13, rtol=0)
    assert torch.isfinite(dx).all() and not y[0, 0, 1].any()


@pytest.mark.parametrize("nu", [1, 2])
def test_fused_gradcheck(nu):
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: dpfp_sum_normalised(t, nu, EPS), (x.requires_grad_(),))


def test_fused_fp32_as_close_to_fp64_as_the_formula():
    """fp32 against fp64: each output is a product over a sum of 2 D nu = 256 features and each
    input gradient sums 2 nu shifted products and a 256-term dot product, so round-off is
    bounded by about n * 2^-24 relative to the largest term (n = 256); the fused form sums in
    another order than autograd, so it must stay within that bound and near the formula's own
    fp32 error."""
    nu, x64 = 2, inputs(torch.float64, shape=(4, 4, 16, 64))
    g64 = torch.randn(*x64.shape[:-1], 256, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_y, ref_dx = value_and_grad(lambda t: formula(t, nu), x64, g64)
    x32, g32 = x64.detach().float().requires_grad_(), g64.float()
    bound = 256 * 2.0 ** -24
    for fn in (dpfp_sum_normalised, formula):
        extra = (nu, EPS) if fn is dpfp_sum_normalised else (nu,)
        y, dx = value_and_grad(lambda t: fn(t, *extra), x32, g32)
        assert (y.double() - ref_y).abs().max() <= bound * ref_y.abs().max()
        assert (dx.double() - ref_dx).abs().max() <= bound * ref_dx.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_inputs_computed_in_fp32(dtype):
    x = inputs(torch.float64).detach()
    y = dpfp_sum_normalised(x.to(dtype), 2, EPS)
    assert y.dtype == dtype
    torch.testing.assert_close(y, dpfp_sum_normalised(x.to(dtype).float(), 2, EPS).to(dtype), atol=0, rtol=0)
    xh = x.to(dtype).requires_grad_()
    dpfp_sum_normalised(xh, 2, EPS).sum().backward()
    assert xh.grad.dtype == dtype


def test_orders_of_a_full_turn_use_the_formula():
    """nu >= 2 D shifts by a full turn or more: the map keeps the formula, the fused function
    refuses with an error naming nu."""
    x = inputs(torch.float64, shape=(2, 3, 4, 2))
    fm = DPFPFeatureMap(2, 4)
    torch.testing.assert_close(fm.normalised(x, "sum", EPS), formula(x, 4), atol=0, rtol=0)
    with pytest.raises(ValueError, match="nu"):
        dpfp_sum_normalised(x, 4, EPS)


def test_layer_features_are_the_formula():
    """FastWeightAttention's DPFP features (sum-normalised) come from the fused function and
    equal the formula, gradients included (fp64)."""
    from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention
    a = FastWeightAttention(16, 2, self_attention=True, feature_map="dpfp", dpfp_nu=2).double()
    assert a.phi_norm == "sum"
    x = inputs(torch.float64, shape=(3, 2, 5, 8))
    g = torch.randn(3, 2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y, dx = value_and_grad(a._phi, x, g)
    assert "DPFPSumNormalised" in type(y.grad_fn).__name__
    y_ref, dx_ref = value_and_grad(lambda t: sum_normalize(DPFPFeatureMap(8, 2)(t), a.eps), x, g)
    torch.testing.assert_close(y, y_ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-13, rtol=0)
