"""Non-causal form (encoders, encoder-decoder attention): every query reads the state after all keys."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_noncausal, fast_weight_read, fast_weight_state

from helpers import make_inputs, rel_err


def test_matches_explicit_sum():
    q, k, v, _, _ = make_inputs(2, 3, 11, 5, 4, requires_grad=False)
    o, S = fast_weight_noncausal(q, k, v, output_final_state=True)
    S_ref = torch.einsum("bhtk,bhtv->bhkv", k, v)
    assert rel_err(S, S_ref) < 1e-12
    assert rel_err(o, torch.einsum("bhtk,bhkv->bhtv", q, S_ref)) < 1e-12


def test_padding_mask_drops_keys():
    q, k, v, _, _ = make_inputs(2, 2, 9, 4, 3, requires_grad=False)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True  # right padding
    mask[1, :2] = True  # left padding
    o, _ = fast_weight_noncausal(q, k, v, key_padding_mask=mask)
    o0, _ = fast_weight_noncausal(q[:1], k[:1, :, :6], v[:1, :, :6])
    o1, _ = fast_weight_noncausal(q[1:], k[1:, :, 2:], v[1:, :, 2:])
    assert rel_err(o[:1], o0) < 1e-12 and rel_err(o[1:], o1) < 1e-12


def test_state_then_read():
    q, k, v, _, _ = make_inputs(1, 2, 7, 3, 3, requires_grad=False)
    assert rel_err(fast_weight_read(q, fast_weight_state(k, v)), fast_weight_noncausal(q, k, v)[0]) < 1e-12


def test_gradcheck():
    q, k, v, _, _ = make_inputs(1, 1, 4, 3, 2)
    mask = torch.tensor([[False, False, True, False]])
    assert torch.autograd.gradcheck(lambda q, k, v: fast_weight_noncausal(q, k, v, mask)[0], (q, k, v))


def test_bad_mask():
    q, k, v, _, _ = make_inputs(1, 1, 4, 3, 2, requires_grad=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        fast_weight_noncausal(q, k, v, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
