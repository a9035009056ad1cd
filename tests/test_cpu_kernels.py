"""The compiled CPU kernels (csrc/short_conv_cpu.cpp, csrc/output_norm_cpu.cpp, built by
modules/cpu_kernels.py) against the PyTorch paths they replace, which are the references
(themselves checked against taps written out in test_gated_deltanet_layer.py): outputs, every
gradient and the carried tail, over kernel sizes, lengths shorter and longer than the kernel,
odd channel counts (vector tails), fp32 and fp64, and the same numbers at any thread count; and
the fallback where the kernels cannot be built."""
import shutil
import warnings

import pytest
import torch

from fwp_fairseq.modules import cpu_kernels
from fwp_fairseq.modules.output_norm import OutputNorm
from fwp_fairseq.modules.short_conv import ShortConvolution

# fp64: both paths sum the same products in another order; fp32: a few ulps of the largest
# term (the sums have at most K or D terms of size ~1).
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.fixture(scope="module", autouse=True)
def built():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the CPU kernels cannot be built here (the PyTorch paths run)")
    assert cpu_kernels.extension() is not None, "the CPU kernels failed to build (see the warning)"


def _grads(fn, leaves, seed=0):
    """fn(*leaves) -> (output, other outputs...); a random linear loss on all of them; returns
    the outputs and every leaf's gradient (None where it gets none)."""
    for leaf in leaves:
        leaf.grad = None
    outs = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs if o is not None)
    loss.backward()
    return [o.detach() for o in outs if o is not None] + [leaf.grad for leaf in leaves]


def _close(a_list, b_list, tol):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["causal", "causal+tail", "centred"])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_short_conv_kernel_equals_the_pytorch_path(dtype, mode, K, T):
    C = 37  # not a multiple of a vector width
    conv = ShortConvolution(C, K, causal=mode != "centred").to(dtype)
    g = torch.Generator().manual_seed(K * 100 + T)
    x = torch.randn(T, 3, C, generator=g, dtype=dtype).requires_grad_()
    leaves = [x, conv.weight]
    tail = None
    if mode == "causal+tail":
        tail = torch.randn(3, C, K - 1, generator=g, dtype=dtype).requires_grad_()
        leaves.append(tail)

    def fn(compiled):
        return lambda x, w, *t: conv(x, tail, compiled=compiled)

    ref = _grads(fn(False), leaves)
    fast = _grads(fn(True), leaves)
    _close(fast, ref, TOL[dtype])


def test_short_conv_kernel_takes_parts_and_padding():
    """The layer's call: q, k, v as three parts, padding, a tail; each part comes back on its own."""
    conv = ShortConvolution(3 * 8, 4).double()
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(6, 2, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    tail = torch.randn(2, 24, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False, False, False], [False] * 6])

    def fn(compiled):
        def run(*leaves):
            outs, new_tail = conv(list(leaves[:3]), tail, mask, compiled=compiled)
            return (*outs, new_tail)
        return run

    _close(_grads(fn(True), parts + [conv.weight]), _grads(fn(False), parts + [conv.weight]), 1e-12)
    whole, _ = conv(torch.cat(parts, -1), tail, mask)
    split, _ = conv(parts, tail, mask)
    torch.testing.assert_close(torch.cat(split, -1), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 24 channels"):
        conv(parts[:2], tail)
    with pytest.raises(ValueError, match=r"tail: expected \(2, 24, 3\)"):
        conv(parts, tail[:, :, :2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["rms", "rms-gated"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (2, 4, 9, 64), (3, 2, 1, 8)])
def test_output_norm_kernel_equals_the_pytorch_path(dtype, kind, shape):
    B, H, T, D = shape
    norm = OutputNorm(kind, H * D + 3, H, D).to(dtype)
    g = torch.Generator().manual_seed(sum(shape))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g, dtype=dtype))
    o = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
    x = torch.randn(T, B, H * D + 3, generator=g, dtype=dtype).requires_grad_()
    leaves = [o, x, norm.weight] + ([norm.gate_proj.weight] if norm.gate_proj is not None else [])

    def fn(compiled):
        return lambda o, x, *_: (norm(o, x, compiled=compiled),)

    _close(_grads(fn(True), leaves), _grads(fn(False), leaves), 4 * TOL[dtype])


def test_output_norm_kernel_reads_a_permuted_read_out():
    """The read-out arrives in whatever layout the recurrence left it: the kernel's input is
    made contiguous first."""
    norm = OutputNorm("rms-gated", 12, 3, 4).double()
    o = torch.randn(5, 2, 3, 4, dtype=torch.float64).permute(1, 2, 0, 3)  # (B, H, T, D), not contiguous
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    torch.testing.assert_close(norm(o, x, compiled=True), norm(o, x, compiled=False), rtol=1e-12, atol=1e-12)


def test_kernels_give_the_same_numbers_at_any_thread_count():
    """Channel blocks (the convolution) and per-(b, h) partial sums (the norm's scale) keep every
    sum in one order whatever the threads."""
    conv, norm = ShortConvolution(96, 4), OutputNorm("rms-gated", 64, 4, 16)
    x = torch.randn(40, 3, 96).requires_grad_()
    o, xin = torch.randn(3, 4, 40, 16).requires_grad_(), torch.randn(40, 3, 64).requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(lambda x, w: (conv(x, compiled=True)[0],), [x, conv.weight])
                           + _grads(lambda o, xin, w: (norm(o, xin, compiled=True),), [o, xin, norm.weight]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        _close(other, results[0], 0)


def test_half_inputs_take_the_pytorch_path():
    x = torch.randn(5, 2, 8, dtype=torch.bfloat16)
    assert not cpu_kernels.applies(x)
    assert cpu_kernels.applies(x.float()) and not cpu_kernels.applies(x.float(), x.double())
    y, _ = ShortConvolution(8, 4).to(torch.bfloat16)(x)  # runs (PyTorch path)
    assert y.dtype == torch.bfloat16


def test_without_the_kernels_the_pytorch_paths_run_after_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    with pytest.warns(UserWarning, match="PyTorch paths.*FWP_FAIRSEQ_CPU_KERNELS=0"):
        assert cpu_kernels.extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert not cpu_kernels.applies(torch.zeros(1))
        conv = ShortConvolution(6, 3)
        x = torch.randn(4, 2, 6)
        torch.testing.assert_close(conv(x)[0], conv(x, compiled=False)[0], rtol=0, atol=0)


def test_a_failed_build_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)

    def no_compiler(name, flags):
        raise RuntimeError("Error building extension 'fwp_cpu_kernels'\nmore")
    monkeypatch.setattr(cpu_kernels, "_build", no_compiler)
    with pytest.warns(UserWarning, match="RuntimeError: Error building extension 'fwp_cpu_kernels'"):
        assert cpu_kernels.extension() is None
