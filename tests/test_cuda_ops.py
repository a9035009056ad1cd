"""impl="cuda" against the reference on a GPU, and its clear errors where there is none.

The GPU tests skip (with the reason from cuda_available()) on machines without a usable CUDA
device; scripts/gpu_check.sh runs them on one."""
import pytest
import torch

from fwp_fairseq.ops import cuda_available, cuda_backend, fast_weight_delta, fast_weight_sum

from helpers import loss_grads, positive_inputs, rel_err


def _call(delta, impl, q, k, v, beta, h0, final=True):
    if delta:
        return fast_weight_delta(q, k, v, beta, h0, output_final_state=final, impl=impl)
    return fast_weight_sum(q, k, v, h0, output_final_state=final, impl=impl)


def _run(delta, impl, inputs):
    """{"o", "final", and the gradients} of a fixed random loss on (o, final state)."""
    return loss_grads(lambda *xs: _call(delta, impl, *xs), inputs)


def _rel_rms(a, b):
    a, b = a.double(), b.double()
    return (((a - b) ** 2).mean().sqrt() / (b ** 2).mean().sqrt().clamp_min(1e-30)).item()


def _assert_close(got, want, delta, err, tol):
    """Every output and gradient (beta's with the delta rule only) within tol by err."""
    names = {"o", "final", "q", "k", "v", "h0"} | ({"beta"} if delta else set())
    assert got.keys() == want.keys() == names
    for name in want:
        assert err(got[name], want[name]) < tol, (name, err(got[name], want[name]))


# ---------------------------------------------------------------- CPU side (runs everywhere)

def test_available_never_raises_and_gives_a_reason():
    ok, why = cuda_available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok and ("CUDA" in why or "cuda" in why)
    assert cuda_available() == (ok, why)  # cached


def test_impl_cuda_on_cpu_tensors_raises_clearly():
    q, k, v, beta, h0 = positive_inputs(1, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fast_weight_delta(q, k, v, beta, impl="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        fast_weight_sum(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_backend.delta_rule_cuda(q, k, v, beta)


def test_auto_on_cpu_does_not_need_cuda():
    q, k, v, beta, h0 = positive_inputs(1, 1, 4, 8, 8)
    o, _ = fast_weight_delta(q, k, v, beta, impl="auto")
    assert o.shape == v.shape


def test_supported_shapes_and_dtypes():
    q = torch.zeros(1, 1, 2, 512)
    assert cuda_backend.supports(q, torch.zeros(1, 1, 2, 256))[0]
    ok, why = cuda_backend.supports(torch.zeros(1, 1, 2, 513), torch.zeros(1, 1, 2, 8))
    assert not ok and "512" in why
    ok, why = cuda_backend.supports(q, torch.zeros(1, 1, 2, 257))
    assert not ok and "256" in why


# ---------------------------------------------------------------- GPU

@pytest.fixture(scope="module")
def cuda():
    ok, why = cuda_available()
    if not ok:
        pytest.skip(f"impl='cuda' unavailable: {why}")
    return torch.device("cuda")


# (B, H, T, Dk, Dv): odd T, Dk != Dv both ways, padding (Dk, Dv not multiples of 8), the largest
# key and value dims, several checkpoint segments (T > 128), and a partial last chunk.
SHAPES = [(2, 3, 63, 64, 64), (1, 2, 1000, 32, 48), (1, 1, 1, 16, 16), (2, 1, 300, 100, 36),
          (1, 2, 150, 512, 64), (1, 1, 130, 64, 256), (1, 2, 257, 128, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_reference(cuda, shape, delta):
    inputs = positive_inputs(*shape, dtype=torch.float32, device=cuda)
    got = _run(delta, "cuda", inputs)
    want = _run(delta, "reference", [x.double() for x in inputs])
    assert got["o"].dtype == torch.float32 and got["final"].dtype == torch.float32
    _assert_close(got, want, delta, rel_err, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("shape", [(1, 2, 300, 24, 40), (1, 1, 70, 512, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp64_matches_reference(cuda, shape, delta):
    inputs = positive_inputs(*shape, dtype=torch.float64, device=cuda)
    got = _run(delta, "cuda", inputs)
    want = _run(delta, "reference", inputs)
    assert got["final"].dtype == torch.float64
    _assert_close(got, want, delta, rel_err, 1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_half_precision_long_sequence(cuda, dtype, delta):
    inputs = positive_inputs(1, 2, 4096, 64, 64, dtype=dtype, device=cuda, seed=2)
    got = _run(delta, "cuda", inputs)
    want = _run(delta, "chunked", [x.float() for x in inputs])  # fp32 on the same rounded inputs
    assert got["o"].dtype == dtype and got["final"].dtype == torch.float32
    _assert_close(got, want, delta, _rel_rms, 0.005)


@pytest.mark.gpu
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_state_carry_equals_one_pass(cuda, delta):
    q, k, v, beta, h0 = positive_inputs(2, 2, 200, 64, 32, device=cuda, seed=4)
    o, ht = _call(delta, "cuda", q, k, v, beta, h0)
    cut = 77
    o1, h1 = _call(delta, "cuda", q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], beta[:, :, :cut], h0)
    o2, h2 = _call(delta, "cuda", q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], beta[:, :, cut:], h1)
    assert rel_err(torch.cat([o1, o2], 2), o) < 1e-5
    assert rel_err(h2, ht) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reruns_are_bit_identical(cuda, dtype):
    inputs = positive_inputs(2, 4, 700, 128, 64, dtype=dtype, device=cuda, seed=6)
    for delta in (True, False):
        a = _run(delta, "cuda", inputs)
        b = _run(delta, "cuda", inputs)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.gpu
def test_auto_agrees_and_noncontiguous_inputs_work(cuda):
    q, k, v, beta, h0 = positive_inputs(2, 3, 50, 32, 32, device=cuda)
    o_cuda, _ = fast_weight_delta(q, k, v, beta, h0, impl="cuda")
    o_auto, _ = fast_weight_delta(q, k, v, beta, h0, impl="auto")
    assert rel_err(o_auto, o_cuda) < 1e-5
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    o_nc, _ = fast_weight_delta(qt, k, v, beta, h0, impl="cuda")
    assert torch.equal(o_nc, o_cuda)


@pytest.mark.gpu
def test_gradient_to_some_inputs_only(cuda):
    q, k, v, beta, h0 = positive_inputs(1, 2, 40, 16, 16, device=cuda)
    v.requires_grad_(True)
    o, _ = fast_weight_delta(q, k, v, beta, h0, impl="cuda")
    o.sum().backward()
    v_ref = v.detach().double().requires_grad_(True)
    o_ref, _ = fast_weight_delta(q.double(), k.double(), v_ref, beta.double(), h0.double(),
                                 impl="reference")
    o_ref.sum().backward()
    assert rel_err(v.grad, v_ref.grad) < 1e-5


@pytest.mark.gpu
def test_too_large_dims_raise(cuda):
    q, k, v, beta, _ = positive_inputs(1, 1, 4, 520, 8, device=cuda)
    with pytest.raises(ValueError, match="512"):
        fast_weight_delta(q, k, v, beta, impl="cuda")
