"""fwp_fairseq/ops/plan.py: one decision of a causal call's order and implementation, from
(device, kernels available, dtype, T, Dk, Dv, rule, gate, state in / out). A GPU with the CUDA
extension is faked (Call(device="cuda", kernels=True)): no tensor is made on a device."""
import pytest
import torch

from fwp_fairseq.ops import IMPLS, cuda_backend, fast_weight_delta, fast_weight_sum, plan
from fwp_fairseq.ops.plan import Call, Plan, causal_order, decide

from helpers import make_inputs

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
QUAD, CHUNKED, CUDA, REF = (Plan("quadratic", "quadratic"), Plan("state", "chunked"),
                            Plan("state", "cuda"), Plan("state", "reference"))

# (device, kernels, dtype, T, Dk, Dv, rule, gated, initial_state, output_final_state) -> plan
CASES = [
    # CPU: what impl="auto" did before plan.py, unchanged
    (("cpu", False, F32, 15, 256, 64, "sum", False, False, False), QUAD),
    (("cpu", False, F32, 15, 256, 64, "delta", False, False, False), QUAD),
    (("cpu", False, F64, 300, 64, 64, "delta", False, False, False), CHUNKED),  # past the crossover
    (("cpu", False, F32, 4096, 64, 64, "delta", False, False, False), CHUNKED),
    (("cpu", False, F32, 15, 256, 64, "sum", False, True, False), CHUNKED),  # a state in
    (("cpu", False, F32, 15, 256, 64, "delta", False, False, True), CHUNKED),  # a state out
    (("cpu", False, F32, 15, 256, 64, "sum", True, False, False), CHUNKED),  # gated
    (("cpu", False, F32, 1, 256, 64, "delta", True, True, True), REF),  # one decoding step
    (("cpu", True, BF16, 500, 64, 64, "sum", False, False, False), CHUNKED),  # kernels need CUDA tensors
    # a GPU without the extension: as on the CPU
    (("cuda", False, F32, 15, 256, 64, "delta", False, False, False), QUAD),
    (("cuda", False, BF16, 500, 64, 64, "delta", False, False, True), CHUNKED),
    # a GPU with the extension: the kernel weighed against the attention order
    (("cuda", True, F32, 15, 256, 64, "delta", False, False, False), CUDA),  # old: QUAD (see below)
    (("cuda", True, BF16, 40, 64, 64, "delta", False, False, False), CUDA),
    (("cuda", True, F32, 15, 256, 64, "sum", False, False, False), QUAD),  # two batched products
    (("cuda", True, F32, 500, 256, 64, "sum", False, False, False), CUDA),
    (("cuda", True, BF16, 4096, 64, 64, "delta", False, False, False), CUDA),  # the chunk kernels: not yet
    (("cuda", True, BF16, 300, 64, 64, "sum", True, True, True), CUDA),  # gated, stateful
    (("cuda", True, F32, 15, 1024, 64, "delta", False, False, False), QUAD),  # Dk past the kernel's 512
    (("cuda", True, F32, 4096, 1024, 64, "delta", False, False, False), CHUNKED),
    (("cuda", True, F32, 4096, 64, 512, "sum", False, True, False), CHUNKED),  # Dv past the kernel's 256
    (("cuda", True, F32, 1, 64, 64, "delta", True, True, True), REF),
]


@pytest.mark.parametrize("args,want", CASES, ids=[f"{c[0][0]}{'+ext' if c[0][1] else ''}-{c[0][6]}-T{c[0][3]}-"
                                                  f"{str(c[0][2])[6:]}-{i}" for i, c in enumerate(CASES)])
def test_decide_table(args, want):
    device, kernels, dtype, T, Dk, Dv, rule, gated, h0, final = args
    call = Call(rule, T, Dk, Dv, dtype, device, kernels, gated, h0, final)
    assert decide(call) == want


def test_on_a_gpu_the_kernel_is_weighed_against_the_attention_order():
    """The CPU flop rule sends a short delta-rule call to the attention order (an fp32
    triangular solve); on a GPU with the extension the table's kernel row comes first. Before
    plan.py, dispatch asked the flop rule before the kernels were considered: QUAD here."""
    assert causal_order("delta", 15, 256, 64) == "quadratic"
    gpu = Call("delta", 15, 256, 64, F32, "cuda", kernels=True)
    assert decide(gpu) == CUDA
    assert decide(gpu._replace(kernels=False)) == QUAD
    assert decide(gpu._replace(device="cpu")) == QUAD
    assert decide(gpu, "chunked") == CHUNKED  # a named impl is taken as it is


def test_named_impls_and_the_one_list():
    assert IMPLS == ("auto", "reference", "chunked", "cuda")  # what users name, as before
    assert set(IMPLS[1:]) < set(plan.IMPLEMENTATIONS)
    for name in IMPLS[1:]:
        assert decide(Call("sum", 15, 256, 64, F32), name) == Plan("state", name)
    for impl in ("quadratic", "cuda-chunk", "fast"):  # auto alone picks the first two
        with pytest.raises(ValueError, match="impl: expected one of"):
            decide(Call("sum", 15, 256, 64, F32), impl)
    assert plan.CHUNK_ROW not in plan.TABLE


def test_every_row_says_where_its_numbers_come_from():
    for row in (*plan.TABLE, plan.CHUNK_ROW):
        assert row.impl in plan.IMPLEMENTATIONS
        assert "measured" in row.source or "no number" in row.source, row
        if plan.IMPLEMENTATIONS[row.impl].kernel:
            assert "placeholder until measured on a GPU" in row.source, row


@pytest.mark.parametrize("op", ["sum", "delta"])
def test_cpu_calls_never_probe_cuda(op, monkeypatch):
    """describe() asks for the extension only for CUDA tensors: a CPU call never builds it."""
    def probe():
        raise AssertionError("probed")
    monkeypatch.setattr(cuda_backend, "available", probe)
    q, k, v, beta, h0 = make_inputs(1, 2, 80, 8, 4, with_state=True, requires_grad=False)
    if op == "sum":
        fast_weight_sum(q, k, v, h0, True)
        fast_weight_sum(q, k, v)
    else:
        fast_weight_delta(q, k, v, beta, h0, True)
        fast_weight_delta(q, k, v, beta)
