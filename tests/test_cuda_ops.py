"""impl="cuda" against the reference on a GPU, and its clear errors where there is none.

The GPU tests skip (with the reason from cuda_available()) on machines without a usable CUDA
device; scripts/gpu_check.sh runs them on one."""
import pytest
import torch

from fwp_fairseq.ops import cuda_available, cuda_backend, fast_weight_delta, fast_weight_sum

from helpers import INPUT_NAMES, POSITIVE, gated_reference, loss_grads, make_inputs, skewed_log_decay


def _call(delta, impl, q, k, v, beta, h0, final=True):
    if delta:
        return fast_weight_delta(q, k, v, beta, h0, output_final_state=final, impl=impl)
    return fast_weight_sum(q, k, v, h0, output_final_state=final, impl=impl)


def _run(delta, impl, inputs):
    """helpers.loss_grads as a list in _names(delta) order (None for an input without a
    gradient). impl: an impl name, or a function of (q, k, v, beta, h0, g) for the gated rule
    (inputs then end with g)."""
    fn = impl if callable(impl) else (lambda *xs: _call(delta, impl, *xs))
    out = loss_grads(fn, inputs)
    names = [n for n in INPUT_NAMES[:len(inputs)] if delta or n != "beta"]
    return [out["o"], out["final"], *(out.get(n) for n in names)]


def _rel_max(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _rel_rms(a, b):
    a, b = a.double(), b.double()
    return (((a - b) ** 2).mean().sqrt() / (b ** 2).mean().sqrt().clamp_min(1e-30)).item()


NAMES = ["o", "final", "dq", "dk", "dv", "dbeta", "dh0", "dg"]


def _names(delta):
    return NAMES if delta else [n for n in NAMES if n != "dbeta"]


# ---------------------------------------------------------------- CPU side (runs everywhere)

def test_available_never_raises_and_gives_a_reason():
    ok, why = cuda_available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok and ("CUDA" in why or "cuda" in why)
    assert cuda_available() == (ok, why)  # cached


def test_impl_cuda_on_cpu_tensors_raises_clearly():
    q, k, v, beta, h0 = make_inputs(1, 1, 4, 8, 8, torch.float32, **POSITIVE)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fast_weight_delta(q, k, v, beta, impl="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        fast_weight_sum(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_backend.delta_rule_cuda(q, k, v, beta)


def test_unknown_kernel_is_refused_before_anything_runs():
    q, k, v, beta, h0 = make_inputs(1, 1, 4, 8, 8, torch.float32, **POSITIVE)
    with pytest.raises(ValueError, match="kernel"):
        cuda_backend.delta_rule_cuda(q, k, v, beta, kernel="tiles")
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_backend.sum_rule_cuda(q, k, v, kernel="chunk")


def test_auto_on_cpu_does_not_need_cuda():
    q, k, v, beta, h0 = make_inputs(1, 1, 4, 8, 8, torch.float32, **POSITIVE)
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

def _gated(delta, impl):
    """(q, k, v, beta, h0, g) -> (o, final state) of the rule with the forget gate a_t = exp(g_t):
    the CUDA kernels or the stepwise reference."""
    if impl == "reference":
        return lambda q, k, v, b, h0, g: gated_reference(q, k, v, b if delta else None, h0, g)
    if delta:
        return lambda q, k, v, b, h0, g: cuda_backend.delta_rule_cuda(q, k, v, b, h0, True, g=g)
    return lambda q, k, v, b, h0, g: cuda_backend.sum_rule_cuda(q, k, v, h0, True, g=g)


def _impl(delta, impl, gated):
    return _gated(delta, impl) if gated else impl


def _inputs(shape, dtype, device, gated, seed=0):
    """make_inputs(**POSITIVE), and for the gated rule a log-decay g down to -5 after them."""
    xs = make_inputs(*shape, dtype=dtype, device=device, seed=seed, **POSITIVE)
    return xs + [skewed_log_decay(*shape[:3], dtype=dtype, device=device, seed=seed)] if gated else xs


GATED = pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])


# (B, H, T, Dk, Dv): odd T, Dk != Dv both ways, padding (Dk, Dv not multiples of 8), the largest
# key and value dims, several checkpoint segments (T > 128), and a partial last chunk.
SHAPES = [
    (2, 3, 63, 64, 64),
    (1, 2, 1000, 32, 48),
    (1, 1, 1, 16, 16),
    (2, 1, 300, 100, 36),
    (1, 2, 150, 512, 64),
    (1, 1, 130, 64, 256),
    (1, 2, 257, 128, 128),
]


@pytest.mark.gpu
@GATED
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_reference(cuda, shape, delta, gated):
    inputs = _inputs(shape, torch.float32, cuda, gated)
    got = _run(delta, _impl(delta, "cuda", gated), inputs)
    want = _run(delta, _impl(delta, "reference", gated), [x.double() for x in inputs])
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert len(got) == len(_names(delta)) - (not gated)  # dg when gated
    for name, a, b in zip(_names(delta), got, want):
        assert _rel_max(a, b) < 1e-5, (name, _rel_max(a, b))


@pytest.mark.gpu
@GATED
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("shape", [(1, 2, 300, 24, 40), (1, 1, 70, 512, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp64_matches_reference(cuda, shape, delta, gated):
    inputs = _inputs(shape, torch.float64, cuda, gated)
    got = _run(delta, _impl(delta, "cuda", gated), inputs)
    want = _run(delta, _impl(delta, "reference", gated), inputs)
    assert got[1].dtype == torch.float64
    for name, a, b in zip(_names(delta), got, want):
        assert _rel_max(a, b) < 1e-10, (name, _rel_max(a, b))


@pytest.mark.gpu
@GATED
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_half_precision_long_sequence(cuda, dtype, delta, gated):
    # gated: against the stepwise reference (fp64), on a shorter sequence
    inputs = _inputs((1, 2, 1024 if gated else 4096, 64, 64), dtype, cuda, gated, seed=2)
    got = _run(delta, _impl(delta, "cuda", gated), inputs)
    ref, ref_dtype = ("reference", torch.float64) if gated else ("chunked", torch.float32)
    want = _run(delta, _impl(delta, ref, gated), [x.to(ref_dtype) for x in inputs])  # same rounding
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, b in zip(_names(delta), got, want):
        assert _rel_rms(a, b) < 0.005, (name, _rel_rms(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_state_carry_equals_one_pass(cuda, delta):
    q, k, v, beta, h0 = make_inputs(2, 2, 200, 64, 32, torch.float32, device=cuda, seed=4, **POSITIVE)
    o, ht = _call(delta, "cuda", q, k, v, beta, h0)
    cut = 77
    o1, h1 = _call(delta, "cuda", q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], beta[:, :, :cut], h0)
    o2, h2 = _call(delta, "cuda", q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], beta[:, :, cut:], h1)
    assert _rel_max(torch.cat([o1, o2], 2), o) < 1e-5
    assert _rel_max(h2, ht) < 1e-5


@pytest.mark.gpu
@GATED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reruns_are_bit_identical(cuda, dtype, gated):
    inputs = _inputs((2, 4, 700, 128, 64), dtype, cuda, gated, seed=6)
    for delta in (True, False):
        a = _run(delta, _impl(delta, "cuda", gated), inputs)
        b = _run(delta, _impl(delta, "cuda", gated), inputs)
        for name, x, y in zip(_names(delta), a, b):
            assert torch.equal(x, y), name


@pytest.mark.gpu
def test_auto_agrees_and_noncontiguous_inputs_work(cuda):
    q, k, v, beta, h0 = make_inputs(2, 3, 50, 32, 32, torch.float32, device=cuda, **POSITIVE)
    o_cuda, _ = fast_weight_delta(q, k, v, beta, h0, impl="cuda")
    o_auto, _ = fast_weight_delta(q, k, v, beta, h0, impl="auto")
    assert _rel_max(o_auto, o_cuda) < 1e-5
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    o_nc, _ = fast_weight_delta(qt, k, v, beta, h0, impl="cuda")
    assert torch.equal(o_nc, o_cuda)


@pytest.mark.gpu
def test_gradient_to_some_inputs_only(cuda):
    q, k, v, beta, h0 = make_inputs(1, 2, 40, 16, 16, torch.float32, device=cuda, **POSITIVE)
    v.requires_grad_(True)
    o, _ = fast_weight_delta(q, k, v, beta, h0, impl="cuda")
    o.sum().backward()
    v_ref = v.detach().double().requires_grad_(True)
    o_ref, _ = fast_weight_delta(q.double(), k.double(), v_ref, beta.double(), h0.double(),
                                 impl="reference")
    o_ref.sum().backward()
    assert _rel_max(v.grad, v_ref.grad) < 1e-5


@pytest.mark.gpu
def test_too_large_dims_raise(cuda):
    q, k, v, beta, _ = make_inputs(1, 1, 4, 520, 8, torch.float32, device=cuda, **POSITIVE)
    with pytest.raises(ValueError, match="512"):
        fast_weight_delta(q, k, v, beta, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_zero_gate_is_the_ungated_kernel(cuda, delta):
    inputs = make_inputs(1, 2, 300, 32, 48, torch.float32, device=cuda, seed=3, **POSITIVE)
    got = _run(delta, _gated(delta, "cuda"), inputs + [torch.zeros(1, 2, 300, device=cuda)])
    want = _run(delta, "cuda", inputs)
    for name, a, b in zip(_names(delta), got, want):
        assert _rel_max(a, b) < 1e-6, (name, _rel_max(a, b))
