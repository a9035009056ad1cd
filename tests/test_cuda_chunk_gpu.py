"""kernel="chunk" (the chunkwise tensor-core kernels) on a GPU against the fp64 chunked path, and
its clear errors. Skips (with cuda_available()'s reason) without a usable CUDA device;
scripts/gpu_check.sh runs it on one. The kernels' algorithm is checked on the CPU by
tests/test_cuda_chunk.py (emulated); this file checks the tensor-core build and fp16/bf16."""
import pytest
import torch

from fwp_fairseq.ops import cuda_backend
from fwp_fairseq.ops.delta_rule.chunked import delta_rule_chunked
from fwp_fairseq.ops.sum_rule.chunked import sum_rule_chunked

from helpers import CHUNK_HALF_TOL, POSITIVE, loss_grads, make_inputs, rel_rms

DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
DELTA = pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])


def _chunk(delta):
    if delta:
        return lambda q, k, v, b, h0: cuda_backend.delta_rule_cuda(q, k, v, b, h0, True, kernel="chunk")
    return lambda q, k, v, b, h0: cuda_backend.sum_rule_cuda(q, k, v, h0, True, kernel="chunk")


def _ref(delta):
    if delta:
        return lambda q, k, v, b, h0: delta_rule_chunked(q, k, v, b, h0, True)
    return lambda q, k, v, b, h0: sum_rule_chunked(q, k, v, h0, True)


def _run(fn, inputs, with_h0=True):
    q, k, v, b, h0 = inputs
    return loss_grads(fn, [q, k, v, b, h0 if with_h0 else None])


def _check(shape, dtype, delta, device, with_h0=True, seed=0):
    inputs = make_inputs(*shape, dtype=dtype, device=device, seed=seed, **POSITIVE)
    got = _run(_chunk(delta), inputs, with_h0)
    want = _run(_ref(delta), [x.double() for x in inputs], with_h0)
    assert got["o"].dtype == dtype and got["final"].dtype == torch.float32
    for name in want:
        err = rel_rms(got[name], want[name])
        assert err < CHUNK_HALF_TOL[dtype], (name, err)


@pytest.mark.gpu
@DTYPES
@DELTA
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
def test_chunk_kernel_lengths(cuda, T, dtype, delta):
    _check((2, 3, T, 64, 32), dtype, delta, cuda, with_h0=T != 63)


@pytest.mark.gpu
@DTYPES
@DELTA
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (32, 32), (64, 128), (128, 64), (256, 128), (24, 40)])
def test_chunk_kernel_head_sizes(cuda, Dk, Dv, dtype, delta):
    _check((1, 4, 300, Dk, Dv), dtype, delta, cuda, seed=Dk)


@pytest.mark.gpu
def test_chunk_kernel_reruns_are_bit_identical(cuda):
    inputs = make_inputs(2, 4, 700, 128, 64, dtype=torch.bfloat16, device=cuda, seed=6, **POSITIVE)
    for delta in (True, False):
        a, b = _run(_chunk(delta), inputs), _run(_chunk(delta), inputs)
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.gpu
def test_chunk_kernel_refuses_what_it_does_not_take(cuda):
    q, k, v, beta, h0 = make_inputs(1, 1, 8, 16, 16, dtype=torch.bfloat16, device=cuda, **POSITIVE)
    with pytest.raises(ValueError, match="forget gate"):
        cuda_backend.delta_rule_cuda(q, k, v, beta, g=torch.zeros(1, 1, 8, device=cuda), kernel="chunk")
    with pytest.raises(ValueError, match="dtype"):
        cuda_backend.sum_rule_cuda(q.float(), k.float(), v.float(), kernel="chunk")
    with pytest.raises(ValueError, match="kernel"):
        cuda_backend.sum_rule_cuda(q, k, v, kernel="tiles")


@pytest.mark.gpu
def test_shared_memory_limit_is_the_devices(cuda):
    """The extension's limit (the launch guard's) is the device's opt-in shared memory per block,
    as torch reports it where it does, and the preferred configuration fits sm_80 / sm_90."""
    from fwp_fairseq.ops import chunk_smem
    ext = cuda_backend._extension(torch.zeros(1, device=cuda))
    got = ext.device_smem_optin()
    want = getattr(torch.cuda.get_device_properties(cuda), "shared_memory_per_block_optin", None)
    assert got >= 99 * 1024 and (want is None or got == want)
    like = torch.zeros(1, dtype=torch.bfloat16, device=cuda)
    config, why = chunk_smem.choose_config(ext, like, 256, 128, True, True)
    assert config is not None, why
    if got >= 163 * 1024:
        assert config == ext.chunk_configs(256, 128)[0]


@pytest.mark.gpu
@DTYPES
@DELTA
@pytest.mark.parametrize("Dk", [64, 256])
def test_chunk_kernel_smaller_configurations(cuda, Dk, dtype, delta):
    """The configurations a 99 KiB device (sm_86, sm_89) runs, on this GPU's tensor cores."""
    from fwp_fairseq.ops import cuda_chunk
    ext = cuda_backend._extension(torch.zeros(1, device=cuda))
    for config in ext.chunk_configs(Dk, 32)[1:]:
        fn = lambda q, k, v, b, h0: cuda_chunk.apply_chunked(  # noqa: E731
            ext, q, k, v, b if delta else None, h0, True, delta, config)
        inputs = make_inputs(1, 4, 300, Dk, 32, dtype=dtype, device=cuda, seed=Dk, **POSITIVE)
        got = _run(fn, inputs)
        want = _run(_ref(delta), [x.double() for x in inputs])
        for name in want:
            assert rel_rms(got[name], want[name]) < CHUNK_HALF_TOL[dtype], (name, config)
