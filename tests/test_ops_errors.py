"""Bad input raises a ValueError that names the argument and what was expected."""
import pytest
import torch

from fwp_fairseq.ops import cuda_available, fast_weight_delta, fast_weight_sum

from helpers import make_inputs


@pytest.fixture
def x():
    return make_inputs(2, 2, 5, 4, 3, requires_grad=False)


def test_wrong_rank(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"q: expected a 4-d tensor"):
        fast_weight_sum(q[0], k, v)


def test_mismatched_k(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"k: expected shape"):
        fast_weight_sum(q, k[:, :, :4], v)


def test_mismatched_v(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"v: expected shape"):
        fast_weight_delta(q, k, v[:1], beta)


def test_beta_shape(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"beta: expected shape"):
        fast_weight_delta(q, k, v, beta[:, :1])
    with pytest.raises(ValueError, match=r"beta"):
        fast_weight_delta(q, k, v, None)


def test_state_shape(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(2, 2, 4, 3\)"):
        fast_weight_delta(q, k, v, beta, torch.zeros(2, 2, 3, 4, dtype=q.dtype))


def test_dtype_mismatch(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"k, v: expected dtype"):
        fast_weight_sum(q, k.float(), v)


def test_integer_input(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"q: expected a floating-point tensor"):
        fast_weight_sum(q.long(), k, v)


def test_unknown_impl(x):
    q, k, v, beta, _ = x
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        fast_weight_sum(q, k, v, impl="triton")


def test_cuda_impl_on_cpu_is_a_clear_error(x):
    q, k, v, beta, _ = x
    with pytest.raises((ValueError, RuntimeError), match=r"cuda"):
        fast_weight_delta(q, k, v, beta, impl="cuda")


def test_cuda_available_reports_reason():
    ok, why = cuda_available()
    assert isinstance(ok, bool) and isinstance(why, str)
    if not torch.cuda.is_available():
        assert not ok and why


def test_auto_uses_chunked_on_cpu(x, monkeypatch):
    """With a state out (else short sequences take the attention order, test_ops_order_quadratic)."""
    import fwp_fairseq.ops.dispatch as d
    called = []
    monkeypatch.setattr(d, "delta_rule_chunked", lambda *a: called.append(1) or (None, None))
    q, k, v, beta, _ = x
    fast_weight_delta(q, k, v, beta, output_final_state=True)
    assert called


def test_log_decay_shape_dtype_device(x):
    q, k, v, beta, _ = x
    g = torch.zeros(2, 2, 5, dtype=q.dtype)
    with pytest.raises(ValueError, match=r"g: expected shape \(2, 2, 5\)"):
        fast_weight_sum(q, k, v, g=g[:, :, :4])
    with pytest.raises(ValueError, match=r"g: expected a 3-d tensor"):
        fast_weight_delta(q, k, v, beta, g=g[..., None])
    with pytest.raises(ValueError, match=r"g: expected a floating-point tensor"):
        fast_weight_sum(q, k, v, g=g.long())
    with pytest.raises(ValueError, match=r"g: expected device cpu"):
        fast_weight_delta(q, k, v, beta, g=torch.zeros(2, 2, 5, device="meta"))


@pytest.mark.parametrize("bad", [0.5, float("inf"), float("-inf"), float("nan")])
def test_log_decay_values(x, bad):
    """A decay exp(g) must lie in (0, 1]: checked for CPU tensors."""
    q, k, v, beta, _ = x
    g = torch.full((2, 2, 5), -0.1, dtype=q.dtype)
    g[1, 0, 3] = bad
    for impl in ("reference", "chunked"):
        with pytest.raises(ValueError, match=r"g: expected finite log-decays <= 0"):
            fast_weight_delta(q, k, v, beta, g=g, impl=impl)
        with pytest.raises(ValueError, match=r"g: expected finite log-decays <= 0"):
            fast_weight_sum(q, k, v, g=g, impl=impl)
