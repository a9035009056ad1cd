"""The CUDA kernels' own source, run on the CPU through fwp_fairseq/csrc/fwp_emu.h.

g++ -DFWP_EMU compiles the .cu files with every CUDA thread as a CPU thread (barriers, shuffles,
NaN-filled shared memory with guard bands), and cuda_backend's autograd code drives it through
ctypes exactly as it drives the real extension. This checks the tiling, the chunk staging, the
checkpointed backward and the padding against the reference, without a GPU: fp64 and fp32 for the
algorithm, fp16 (_Float16) and bf16 (fwp_emu::bf16) for the half-input paths (read natively,
accumulated in fp32)."""
import ctypes

import pytest
import torch

from fwp_fairseq.ops import cuda_backend
from fwp_fairseq.ops.delta_rule.reference import delta_rule_reference
from fwp_fairseq.ops.sum_rule.reference import sum_rule_reference

from helpers import (CHUNK_HALF_TOL, POSITIVE, KernelLib, assert_bit_reproducible,
                     assert_no_grad_forward_stores_nothing, assert_rel_close, build_kernel_emulator,
                     gated_reference, loss_grads, make_inputs, rel_rms, skewed_log_decay)

KERNELS = ("recurrence_fwd.cu", "state_grad.cu", "qk_grad.cu")
HEADERS = ("fwp_api.h", "fwp_common.cuh", "fwp_columns.cuh", "fwp_rows.cuh", "fwp_launch.cuh",
           "fwp_emu.h")
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class Emulator(KernelLib):
    """The extension's three functions (binding.cpp), over ctypes, for CPU tensors."""

    def __init__(self, lib):
        P, L, I = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
        self.lib = lib
        for name, args in (
            ("fwp_forward", [I, I] + [P] * 10 + [L, L, I, I, I, P, P]),
            ("fwp_state_grad", [I, I] + [P] * 8 + [L, L, I, I, P, P]),
            ("fwp_qk_grad", [I, I] + [P] * 13 + [L, L, I, I, I, P, P]),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_char_p
        lib.fwp_emu_set_smem_optin.argtypes, lib.fwp_emu_set_smem_optin.restype = [L], None

    def forward(self, q, k, v, beta, a, h0, o, ht, ckpt, err, ck_every, delta, stream):
        p = self._p
        self._check(self.lib.fwp_forward(CODES[q.dtype], int(delta), p(q), p(k), p(v), p(beta),
                                         p(a), p(h0), p(o), p(ht), p(ckpt), p(err), q.shape[0],
                                         q.shape[1], q.shape[2], v.shape[2], ck_every,
                                         self._sizes(q, k, v, beta, a, h0, o, ht, ckpt, err), None))

    def state_grad(self, q, k, dout, beta, a, dht, du, dh0, delta, stream):
        p = self._p
        self._check(self.lib.fwp_state_grad(CODES[q.dtype], int(delta), p(q), p(k), p(dout),
                                            p(beta), p(a), p(dht), p(du), p(dh0), q.shape[0],
                                            q.shape[1], q.shape[2], dout.shape[2],
                                            self._sizes(q, k, dout, beta, a, dht, du, dh0), None))

    def qk_grad(self, q, k, dout, u, da, a, ht, dht, ckpt, dq, dk, dkr, lam, ck_every, delta,
                stream):
        p = self._p
        self._check(self.lib.fwp_qk_grad(CODES[q.dtype], int(delta), p(q), p(k), p(dout), p(u),
                                         p(da), p(a), p(ht), p(dht), p(ckpt), p(dq), p(dk),
                                         p(dkr), p(lam), q.shape[0], q.shape[1], q.shape[2],
                                         dout.shape[2], ck_every,
                                         self._sizes(q, k, dout, u, da, a, ht, dht, ckpt, dq, dk,
                                                     dkr, lam), None))


@pytest.fixture(scope="module")
def emu():
    return Emulator(build_kernel_emulator("seq", KERNELS, HEADERS))


@pytest.fixture
def short_checkpoints(monkeypatch):
    # Small T must still cross several checkpoints; 16 divides every fp32/fp64 chunk used here.
    monkeypatch.setattr(cuda_backend, "CK_EVERY", 16)


def _run(fn, inputs, delta, with_h0=True):
    """(o, final state, {name: gradient}) of helpers.loss_grads. inputs: q, k, v, beta, h0 and,
    gated, g; fn takes no beta for the sum rule."""
    q, k, v, beta, h0, *g = inputs
    call = fn if delta else (lambda q, k, v, beta, h0, *g: fn(q, k, v, h0, *g))
    out = loss_grads(call, [q, k, v, beta, h0 if with_h0 else None, *g])
    return out.pop("o"), out.pop("final"), out


def _emu_fn(emu, delta):
    if delta:
        return lambda q, k, v, b, h0, *g: cuda_backend._apply(emu, q, k, v, b, h0, True, True, *g)
    return lambda q, k, v, h0, *g: cuda_backend._apply(emu, q, k, v, None, h0, True, False, *g)


def _ref_fn(delta):
    if delta:
        return lambda q, k, v, b, h0: delta_rule_reference(q, k, v, b, h0, True)
    return lambda q, k, v, h0: sum_rule_reference(q, k, v, h0, True)


# (B, H, T, Dk, Dv): chunk tails, partial value tiles, Python-side padding, T = 1, the 256/512
# key tiles and the 128/256 value tiles of the q/k gradient pass.
SHAPES = [
    (1, 2, 37, 16, 24),
    (2, 1, 1, 8, 8),
    (1, 1, 21, 12, 10),
    (1, 1, 9, 136, 72),
    (1, 1, 5, 512, 136),
]


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernels_match_reference_fp64(emu, short_checkpoints, shape, delta):
    inputs = make_inputs(*shape, torch.float64, **POSITIVE)
    o, ht, grads = _run(_emu_fn(emu, delta), inputs, delta)
    o_r, ht_r, grads_r = _run(_ref_fn(delta), inputs, delta)
    assert_rel_close(o, o_r, 1e-10)
    assert_rel_close(ht, ht_r, 1e-10)
    assert grads.keys() == grads_r.keys()
    for name in grads_r:
        assert_rel_close(grads[name], grads_r[name], 1e-9)


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_emulated_kernels_fp32_and_no_initial_state(emu, short_checkpoints, delta):
    inputs = make_inputs(1, 1, 40, 64, 32, torch.float32, seed=3, **POSITIVE)
    o, ht, grads = _run(_emu_fn(emu, delta), inputs, delta, with_h0=False)
    ref_inputs = [x.double() for x in inputs]
    o_r, ht_r, grads_r = _run(_ref_fn(delta), ref_inputs, delta, with_h0=False)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert_rel_close(o, o_r, 1e-5)
    assert_rel_close(ht, ht_r, 1e-5)
    for name in grads_r:
        assert_rel_close(grads[name], grads_r[name], 1e-5)


@pytest.mark.parametrize("dtype,gated", [(torch.float16, False), (torch.bfloat16, True)],
                         ids=["fp16", "bf16-gated"])
def test_emulated_kernels_half_inputs(emu, dtype, gated):
    """fp16/bf16 inputs: outputs in the input dtype, final state fp32, and every result within
    CHUNK_HALF_TOL (relative RMS) of fp64 on the same rounded inputs: the bound of the chunk
    kernels, which round more (their tile operands too); measured here at most 2.9e-4 (fp16) and
    2.7e-3 (bf16, gated)."""
    inputs = make_inputs(1, 1, 100, 64, 32, dtype, seed=2, **POSITIVE)
    inputs += [skewed_log_decay(1, 1, 100)] if gated else []
    got = _run(_emu_fn(emu, True), inputs, True)
    ref = _gated_ref_fn(True) if gated else _ref_fn(True)
    want = _run(ref, [x.double() for x in inputs], True)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    pairs = [("o", got[0], want[0]), ("final", got[1], want[1])]
    pairs += [(n, got[2][n], want[2][n]) for n in want[2]]
    for name, a, b in pairs:
        assert rel_rms(a, b) < CHUNK_HALF_TOL[dtype], (name, rel_rms(a, b))


def test_entry_points_refuse_a_buffer_of_the_wrong_size(emu):
    """Every buffer's element count is checked against the launch's shapes (here the checkpoint
    count, ceil(T / ck_every)) before anything runs: an error naming the buffer, nothing written."""
    BH, T, D = 1, 40, 16
    q, k, v = (torch.rand(BH, T, D) for _ in range(3))
    o, ht = torch.full((BH, T, D), 7.0), torch.empty(BH, D, D)
    ckpt = torch.empty(BH, 1, D, D)  # one checkpoint: right for ck_every = 64, not for 16
    with pytest.raises(RuntimeError, match=r"fwp_forward: ckpt has 256 elements, the launch needs "
                                           r"768 = \(BH, ceil\(T / ck_every\), Dk, Dv\)"):
        emu.forward(q, k, v, None, None, None, o, ht, ckpt, None, 16, False, None)
    assert (o == 7.0).all()
    emu.forward(q, k, v, None, None, None, o, ht, ckpt, None, 64, False, None)
    with pytest.raises(RuntimeError, match="fwp_state_grad: du has 40 elements, the launch needs "
                                           "640"):
        emu.state_grad(q, k, v, None, None, None, torch.empty(BH, T, 1), None, False, None)
    with pytest.raises(RuntimeError, match="fwp_qk_grad: dq has 624 elements"):
        emu.qk_grad(q, k, v, v, None, None, ht, None, ckpt, torch.empty(BH, T - 1, D),
                    torch.empty(BH, T, D), None, None, 64, False, None)


def test_a_launch_over_the_device_limit_is_refused(emu):
    """The launch guard bounds the sequential kernels too: the fp32 forward at Dk = 64 (about
    20 KiB per block) on a device playing 16 KiB is refused with the numbers, not launched."""
    q, k, v, beta, h0 = make_inputs(1, 1, 7, 64, 16, torch.float32, **POSITIVE)
    emu.lib.fwp_emu_set_smem_optin(16 * 1024)
    try:
        with pytest.raises(RuntimeError, match="bytes of shared memory per block, the device "
                                               "allows 16384"):
            cuda_backend._apply(emu, q, k, v, beta, h0, False, True)
    finally:
        emu.lib.fwp_emu_set_smem_optin(2 ** 63 - 1)
    cuda_backend._apply(emu, q, k, v, beta, h0, False, True)


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_emulated_kernels_are_bit_reproducible(emu, short_checkpoints, gated):
    inputs = make_inputs(1, 1, 19, 16, 16, torch.float32, seed=5, **POSITIVE)
    inputs += [skewed_log_decay(1, 1, 19)] if gated else []
    assert_bit_reproducible(lambda: _run(_emu_fn(emu, True), inputs, True))


def test_emulated_forward_without_grad_stores_nothing(emu):
    fwd = lambda q, k, v, beta, h0: cuda_backend._apply(emu, q, k, v, beta, h0, False, True)  # noqa: E731
    assert_no_grad_forward_stores_nothing(fwd, (1, 1, 7, 8, 8), torch.float32, 1e-5)


def test_bad_checkpoint_interval_is_reported(emu, monkeypatch):
    monkeypatch.setattr(cuda_backend, "CK_EVERY", 12)
    q, k, v, beta, h0 = make_inputs(1, 1, 7, 8, 8, torch.float32, **POSITIVE)
    with pytest.raises(RuntimeError, match="ck_every"):
        cuda_backend._apply(emu, q, k, v, beta, h0, False, True)


# ---------------------------------------------------------------- the forget gate a_t = exp(g_t)

def _gated_ref_fn(delta):
    if delta:
        return gated_reference
    return lambda q, k, v, h0, g: gated_reference(q, k, v, None, h0, g)


def _check_gated(emu, shape, delta, dtype, tol, with_h0=True, seed=0):
    inputs = make_inputs(*shape, dtype, seed=seed, **POSITIVE) + [skewed_log_decay(*shape[:3], dtype, seed=seed)]
    o, ht, grads = _run(_emu_fn(emu, delta), inputs, delta, with_h0)
    o_r, ht_r, grads_r = _run(_gated_ref_fn(delta), [x.double() for x in inputs], delta, with_h0)
    assert o.dtype == dtype and ht.dtype == dtype
    assert_rel_close(o, o_r, tol)
    assert_rel_close(ht, ht_r, tol)
    assert grads.keys() == grads_r.keys() and "g" in grads
    for name in grads_r:
        assert_rel_close(grads[name], grads_r[name], tol)


# T around the 64-step chunks and past the 128-step checkpoint (a restart in the backward).
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_emulated_gate_matches_stepwise_reference_fp64(emu, T, delta):
    _check_gated(emu, (1, 1, T, 16, 24), delta, torch.float64, 1e-10)


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_emulated_gate_fp32_padding_no_initial_state(emu, delta):
    _check_gated(emu, (1, 2, 200, 12, 20), delta, torch.float32, 1e-5, with_h0=False, seed=1)


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sum"])
def test_emulated_gate_many_restarts_and_wide_rows(emu, short_checkpoints, delta):
    # 256-wide value rows (the 8-row tiles of pass B) and a restart every 16 steps.
    _check_gated(emu, (1, 1, 40, 24, 136), delta, torch.float64, 1e-10, seed=2)


def test_emulated_gate_of_zero_is_the_ungated_rule(emu):
    inputs = make_inputs(1, 1, 30, 16, 16, torch.float64, seed=6, **POSITIVE)
    o, ht, grads = _run(_emu_fn(emu, True), inputs + [torch.zeros(1, 1, 30, dtype=torch.float64)],
                        True)
    o_u, ht_u, grads_u = _run(_emu_fn(emu, True), inputs, True)
    assert_rel_close(o, o_u, 1e-12)
    assert_rel_close(ht, ht_u, 1e-12)
    for name in grads_u:
        assert_rel_close(grads[name], grads_u[name], 1e-12)


def test_bad_gate_shape_is_refused(emu):
    q, k, v, beta, h0 = make_inputs(1, 1, 7, 8, 8, torch.float32, **POSITIVE)
    with pytest.raises(ValueError, match="g must have shape"):
        cuda_backend._apply(emu, q, k, v, beta, h0, False, True, torch.zeros(1, 1, 6))
