"""The chunkwise tensor-core kernels' own source (csrc/chunk_fwd.cu, chunk_bwd.cu), run on the CPU.

g++ -DFWP_EMU compiles them with fwp_emu.h (every CUDA thread a CPU thread) and fwp_mma.cuh's
emulated warp tile products (the same warp-collective calls as WMMA, in plain loops), and
cuda_chunk's autograd code drives them through ctypes exactly as it drives the extension. The
emulator runs the tile inputs in fp64 and fp32 (the algorithm, the tiling and the indexing, against
the fp64 reference) and in fp16 (_Float16) and bf16 (fwp_emu::bf16, rounding as on the GPU), where
the tile products accumulate in fp32 in their own order (not the tensor cores' bit for bit)."""
import ctypes
import logging

import pytest
import torch

from fwp_fairseq.ops import chunk_smem, cuda_backend, cuda_chunk
from fwp_fairseq.ops.delta_rule.reference import delta_rule_reference
from fwp_fairseq.ops.sum_rule.reference import sum_rule_reference

from helpers import (CHUNK_HALF_TOL, POSITIVE, KernelLib, assert_bit_reproducible,
                     assert_no_grad_forward_stores_nothing, assert_rel_close,
                     build_kernel_emulator, loss_grads, make_inputs, rel_rms)

KERNELS = ("chunk_fwd.cu", "chunk_bwd.cu")
HEADERS = ("fwp_api.h", "fwp_common.cuh", "fwp_launch.cuh", "fwp_chunk.cuh", "fwp_mma.cuh",
           "fwp_emu.h")
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class ChunkEmulator(KernelLib):
    """The extension's chunk functions (binding.cpp), over ctypes, for CPU tensors."""

    def __init__(self, lib):
        P, L, I = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
        self.lib = lib
        for name, args in (("fwp_chunk_forward", [I, I] + [P] * 9 + [L, L, I, I, I, I, P, P]),
                           ("fwp_chunk_backward", [I, I] + [P] * 13 + [L, L, I, I, I, I, P, P])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_char_p
        lib.fwp_chunk_configs.argtypes, lib.fwp_chunk_configs.restype = [I, I, P, P], I
        lib.fwp_chunk_smem.argtypes, lib.fwp_chunk_smem.restype = [I] * 6, L
        lib.fwp_device_smem_optin.argtypes, lib.fwp_device_smem_optin.restype = [], L
        lib.fwp_emu_set_smem_optin.argtypes, lib.fwp_emu_set_smem_optin.restype = [L], None

    def chunk_configs(self, Dk, Dv):
        chunks, tiles = (ctypes.c_int * 3)(), (ctypes.c_int * 3)()
        n = self.lib.fwp_chunk_configs(Dk, Dv, chunks, tiles)
        return [(chunks[i], tiles[i]) for i in range(n)]

    def chunk_smem(self, like, delta, backward, Dk, chunk, tile):
        return self.lib.fwp_chunk_smem(CODES[like.dtype], int(delta), int(backward), Dk, chunk,
                                       tile)

    def device_smem_optin(self):
        return self.lib.fwp_device_smem_optin()

    def set_smem_optin(self, nbytes):
        """Play a device with this opt-in shared memory per block (the launches' bound)."""
        self.lib.fwp_emu_set_smem_optin(nbytes)

    def chunk_forward(self, q, k, v, beta, h0, o, ht, states, u, chunk, tile, delta, stream):
        p = self._p
        self._check(self.lib.fwp_chunk_forward(
            CODES[q.dtype], int(delta), p(q), p(k), p(v), p(beta), p(h0), p(o), p(ht), p(states),
            p(u), q.shape[0], q.shape[1], q.shape[2], v.shape[2], chunk, tile,
            self._sizes(q, k, v, beta, h0, o, ht, states, u), None))

    def chunk_backward(self, q, k, v, beta, dout, states, u, dht, dq, dk, dkb, dv, dh0, chunk,
                       tile, delta, stream):
        p = self._p
        self._check(self.lib.fwp_chunk_backward(
            CODES[q.dtype], int(delta), p(q), p(k), p(v), p(beta), p(dout), p(states), p(u),
            p(dht), p(dq), p(dk), p(dkb), p(dv), p(dh0), q.shape[0], q.shape[1], q.shape[2],
            v.shape[2], chunk, tile,
            self._sizes(q, k, v, beta, dout, states, u, dht, dq, dk, dkb, dv, dh0), None))


@pytest.fixture(scope="module")
def emu():
    return ChunkEmulator(build_kernel_emulator("chunk", KERNELS, HEADERS))


def _run(fn, inputs, delta, with_h0=True):
    """(o, final state, {name: gradient}) of helpers.loss_grads."""
    q, k, v, beta, h0 = inputs
    out = loss_grads(fn, [q, k, v, beta, h0 if with_h0 else None])
    return out.pop("o"), out.pop("final"), out


def _emu_fn(emu, delta, config=None):
    return lambda q, k, v, b, h0: cuda_chunk.apply_chunked(emu, q, k, v, b if delta else None, h0,
                                                            True, delta, config)


def _ref_fn(delta):
    if delta:
        return lambda q, k, v, b, h0: delta_rule_reference(q, k, v, b, h0, True)
    return lambda q, k, v, b, h0: sum_rule_reference(q, k, v, h0, True)


def _check(emu, shape, delta, dtype=torch.float64, tol=1e-9, with_h0=True, seed=0, config=None):
    inputs = make_inputs(*shape, dtype, seed=seed, **POSITIVE)
    o, ht, grads = _run(_emu_fn(emu, delta, config), inputs, delta, with_h0)
    o_r, ht_r, grads_r = _run(_ref_fn(delta), [x.double() for x in inputs], delta, with_h0)
    assert o.dtype == dtype and o.shape == o_r.shape and ht.shape == ht_r.shape
    assert_rel_close(o, o_r, tol)
    assert_rel_close(ht, ht_r, tol)
    expected = {"q", "k", "v"} | ({"beta"} if delta else set()) | ({"h0"} if with_h0 else set())
    assert set(grads) >= expected
    for name in expected:
        assert_rel_close(grads[name], grads_r[name], tol)


# T around the 64-step chunk, Dk != Dv, both value tiles (16, 32) and two tiles of 32.
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("T", [1, 63, 64, 65])
def test_chunk_kernels_match_reference_around_the_chunk(emu, T, delta):
    _check(emu, (1, 2, T, 32, 48), delta)


# Every key size (128 and 256 run 32-step chunks) and every value size, padding included.
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (32, 32), (64, 64), (128, 128), (256, 16), (12, 20),
                                   (100, 72)])
def test_chunk_kernels_every_head_size(emu, Dk, Dv, delta):
    _check(emu, (1, 1, 40, Dk, Dv), delta, seed=Dk + Dv)


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_chunk_kernels_long_sequence_fp32_without_initial_state(emu, delta):
    _check(emu, (1, 1, 1000, 16, 16), delta, torch.float32, 2e-5, with_h0=False, seed=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_chunk_kernels_half_inputs_round_like_the_gpu(emu, dtype, delta):
    """fp16/bf16 inputs: outputs and every gradient within the GPU tests' relative RMS error of
    the fp64 reference on the same rounded inputs."""
    inputs = make_inputs(1, 2, 150, 64, 32, dtype, seed=7, **POSITIVE)
    got = _run(_emu_fn(emu, delta), inputs, delta)
    want = _run(_ref_fn(delta), [x.double() for x in inputs], delta)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    pairs = [("o", got[0], want[0]), ("final", got[1], want[1])]
    pairs += [(n, got[2][n], want[2][n]) for n in want[2]]
    for name, a, b in pairs:
        err = rel_rms(a, b)
        assert err < CHUNK_HALF_TOL[dtype], (name, err)


def test_chunk_kernels_are_bit_reproducible(emu):
    inputs = make_inputs(1, 2, 70, 32, 48, torch.float32, seed=5, **POSITIVE)
    assert_bit_reproducible(lambda: _run(_emu_fn(emu, True), inputs, True))


def test_chunk_forward_without_grad_stores_nothing(emu):
    fwd = lambda q, k, v, beta, h0: cuda_chunk.apply_chunked(emu, q, k, v, beta, h0, False, True)  # noqa: E731
    assert_no_grad_forward_stores_nothing(fwd, (1, 1, 70, 16, 16), torch.float64, 1e-10)


def test_chunk_sizes_are_reported(emu):
    # the preferred configuration (chunk, tile) comes first
    assert emu.chunk_configs(64, 64)[0] == (64, 32) and emu.chunk_configs(128, 64)[0] == (32, 32)
    assert emu.chunk_configs(256, 16)[0] == (32, 16) and emu.chunk_configs(16, 128)[0] == (64, 32)
    q, k, v, beta, h0 = make_inputs(1, 1, 5, 16, 16, torch.float64, **POSITIVE)
    # 24 is no kernel key size: only the Python side pads
    err = emu.lib.fwp_chunk_forward(3, 0, *[None] * 9, 1, 5, 24, 16, 64, 16,
                                    emu._sizes(*[None] * 9), None)
    assert b"Dk must be" in err
    with pytest.raises(ValueError, match="Dv=144"):
        cuda_chunk.apply_chunked(emu, q, k, torch.zeros(1, 1, 5, 144, dtype=torch.float64), beta,
                                 None, False, True)


def test_supports_routes_gate_and_wide_dtypes_elsewhere():
    q = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    assert cuda_chunk.supports(q, q)[0]
    assert not cuda_chunk.supports(q, q, g=torch.zeros(1, 1, 4))[0]
    assert not cuda_chunk.supports(q.float(), q.float())[0]
    assert not cuda_chunk.supports(torch.zeros(1, 1, 4, 512, dtype=torch.bfloat16), q)[0]


# ---- launch bounds: shared memory per device class, and the entry points' size checks ----

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the device classes
# the kernels may meet (CUDA programming guide, compute capabilities table).
DEVICE_SMEM = {"sm_80": 163 * 1024, "sm_86/89": 99 * 1024, "sm_90": 227 * 1024}
UNBOUNDED = 2 ** 63 - 1


@pytest.fixture
def device_class(emu, monkeypatch):
    """Play a device with a given opt-in shared memory per block; unbounded again afterwards."""
    monkeypatch.setattr(chunk_smem, "_logged", set())
    yield emu.set_smem_optin
    emu.set_smem_optin(UNBOUNDED)


@pytest.mark.parametrize("device", DEVICE_SMEM)
def test_every_chunk_variant_fits_each_device_class(emu, device_class, device):
    """For every variant the GPU runs (fp16/bf16, sum/delta, forward alone or with the backward,
    each key size, each value size) the configuration chosen for the device needs no more shared
    memory than it allows, by the kernels' own count; sm_80 and sm_90 keep the preferred one,
    sm_86/89 (99 KiB) needs the smaller ones."""
    limit = DEVICE_SMEM[device]
    device_class(limit)
    assert emu.device_smem_optin() == limit
    smaller = 0
    for dtype in cuda_chunk.GPU_DTYPES:
        like = torch.zeros(1, dtype=dtype)
        for delta in (False, True):
            for backward in (False, True):
                for Dk in cuda_chunk.KEY_SIZES:
                    for Dv in range(16, cuda_chunk.MAX_DV + 1, 16):
                        config, why = chunk_smem.choose_config(emu, like, Dk, Dv, delta, backward)
                        assert config is not None, why
                        passes = (False, True) if backward else (False,)
                        need = max(emu.chunk_smem(like, delta, b, Dk, *config) for b in passes)
                        assert 0 < need <= limit, (dtype, delta, backward, Dk, Dv, config, need)
                        preferred = emu.chunk_configs(Dk, Dv)[0]
                        smaller += config != preferred
                        if device != "sm_86/89":
                            assert config == preferred, (dtype, delta, backward, Dk, Dv)
    assert (smaller > 0) == (device == "sm_86/89")


def test_a_launch_over_the_device_limit_is_refused(emu, device_class):
    """The launch guard: the preferred forward at Dk = 256 (112 KiB) on a 99 KiB device fails with
    the numbers instead of launching."""
    device_class(DEVICE_SMEM["sm_86/89"])
    q, k, v, beta, h0 = make_inputs(1, 1, 8, 256, 32, torch.bfloat16, **POSITIVE)
    need = emu.chunk_smem(q, True, False, 256, 32, 32)
    with pytest.raises(RuntimeError, match=f"needs {need} bytes of shared memory per block, the "
                                           f"device allows {99 * 1024}"):
        cuda_chunk.apply_chunked(emu, q, k, v, beta, h0, True, True, (32, 32))


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_a_99_kib_device_runs_the_smaller_configuration(emu, device_class, delta, caplog):
    """Dk = 64 with the backward needs 108 (sum) / 148 (delta) KiB in chunks of 64: a 99 KiB device
    runs chunks of 32, logged, with the GPU tests' bf16 accuracy against the fp64 reference."""
    device_class(DEVICE_SMEM["sm_86/89"])
    inputs = make_inputs(1, 1, 100, 64, 32, torch.bfloat16, seed=3, **POSITIVE)
    with caplog.at_level(logging.INFO, logger=chunk_smem.__name__):
        got = _run(_emu_fn(emu, delta), inputs, delta)
    assert "chunks of 32 steps, value tiles of 32" in caplog.text
    want = _run(_ref_fn(delta), [x.double() for x in inputs], delta)
    pairs = [("o", got[0], want[0]), ("final", got[1], want[1])]
    pairs += [(n, got[2][n], want[2][n]) for n in want[2]]
    for name, a, b in pairs:
        assert rel_rms(a, b) < CHUNK_HALF_TOL[torch.bfloat16], name


# Every smaller configuration (the chunk halved; with 16-column tiles), exact in fp64: T crosses
# chunk boundaries of 32 and 16, Dv = 32 is one tile of 32 or two of 16.
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("Dk", cuda_chunk.KEY_SIZES)
def test_smaller_configurations_match_reference(emu, Dk, delta):
    for config in emu.chunk_configs(Dk, 32)[1:]:
        _check(emu, (1, 1, 40, Dk, 32), delta, seed=Dk, config=config)


def test_chunk_call_falls_back_to_the_sequential_kernel_when_nothing_fits(emu, device_class,
                                                                          monkeypatch, caplog):
    """kernel='chunk' on a device too small for every configuration runs the sequential kernel
    and logs why; on a 99 KiB device the same call stays on the chunk kernels."""
    monkeypatch.setattr(cuda_backend, "_extension", lambda q: emu)
    sequential = []
    monkeypatch.setattr(cuda_backend, "_apply", lambda *a: sequential.append(a) or (None, None))
    q, k, v, beta, h0 = make_inputs(1, 1, 8, 64, 32, torch.bfloat16, **POSITIVE)
    device_class(16 * 1024)
    with caplog.at_level(logging.WARNING, logger=chunk_smem.__name__):
        cuda_backend.delta_rule_cuda(q, k, v, beta, kernel="chunk")
    assert len(sequential) == 1
    assert "the device allows 16384; running the sequential kernel instead" in caplog.text
    device_class(DEVICE_SMEM["sm_86/89"])
    o, _ = cuda_backend.delta_rule_cuda(q, k, v, beta, kernel="chunk")
    assert len(sequential) == 1 and o.shape == v.shape and torch.isfinite(o).all()


def test_chunk_entry_points_refuse_a_buffer_of_the_wrong_size(emu):
    """Every buffer's element count is checked against the launch's shapes (chunk count, tile
    count) before anything runs: a wrong size is an error naming the buffer, nothing is written."""
    BH, T, Dk, Dv = 2, 70, 32, 32
    q, k, v = (torch.rand(BH, T, D, dtype=torch.float64) for D in (Dk, Dk, Dv))
    beta = torch.rand(BH, T, dtype=torch.float64)
    o = torch.full((BH, T, Dv), 7.0, dtype=torch.float64)
    u = torch.empty(BH, T, Dv, dtype=torch.float64)
    ht = torch.empty(BH, Dk, Dv, dtype=torch.float64)
    chunk, tile = 64, 32  # two chunks, one value tile
    short_states = torch.empty(BH, 1, Dk, Dv, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fwp_chunk_forward: states has 2048 elements, the launch "
                                           r"needs 4096 = \(BH, ceil\(T / chunk\), Dk, Dv\)"):
        emu.chunk_forward(q, k, v, beta, None, o, ht, short_states, u, chunk, tile, True, None)
    assert (o == 7.0).all()
    states = torch.empty(BH, 2, Dk, Dv, dtype=torch.float64)
    emu.chunk_forward(q, k, v, beta, None, o, ht, states, u, chunk, tile, True, None)
    with pytest.raises(RuntimeError, match="fwp_chunk_forward: beta is required"):
        emu.chunk_forward(q, k, v, None, None, o, ht, states, u, chunk, tile, True, None)
    # partials sized for one tile of 32, launched with tiles of 16 (two)
    part = lambda: torch.full((1, BH, 2 * chunk, Dk), 7.0, dtype=torch.float64)  # noqa: E731
    dq, dk, dkb = part(), part(), part()
    dv = torch.empty(BH, T, Dv, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fwp_chunk_backward: dq has 8192 elements, the launch "
                                           "needs 16384"):
        emu.chunk_backward(q, k, v, beta, v, states, u, None, dq, dk, dkb, dv, None, chunk, 16,
                           True, None)
    assert (dq == 7.0).all() and (dk == 7.0).all()
    with pytest.raises(RuntimeError, match="fwp_chunk_backward: dh0 has 1 elements"):
        emu.chunk_backward(q, k, v, beta, v, states, u, None, dq, dk, dkb, dv,
                           torch.empty(1, dtype=torch.float64), chunk, tile, True, None)
