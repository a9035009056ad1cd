"""The table-driven impl="auto" rule on a GPU (fwp_fairseq/ops/plan.py): its mechanism, not its
placeholder values. A GPU with the extension is faked (Call(device="cuda", kernels=True))."""
import pytest
import torch

from fwp_fairseq.ops import plan
from fwp_fairseq.ops.plan import Call, Row, decide, describe


def choose(dtype, Dk, Dv, T, gated, table=plan.TABLE, rule="sum"):
    """The implementation impl="auto" takes for a stateful call (so the attention order never
    competes) on a GPU where the CUDA extension is available."""
    call = Call(rule, T, Dk, Dv, dtype, "cuda", kernels=True, gated=gated, initial_state=True)
    return decide(call, "auto", table).impl


def test_first_matching_row_wins_and_nothing_matching_is_chunked():
    table = (Row("cuda-chunk", (torch.bfloat16,), 64, 64, min_t=100),
             Row("cuda", (torch.bfloat16, torch.float32), 512, 256, gated_ok=True))
    assert choose(torch.bfloat16, 64, 64, 100, False, table) == "cuda-chunk"
    assert choose(torch.bfloat16, 64, 64, 99, False, table) == "cuda"  # too short
    assert choose(torch.bfloat16, 128, 64, 500, False, table) == "cuda"  # head too large
    assert choose(torch.bfloat16, 64, 64, 500, True, table) == "cuda"  # gated
    assert choose(torch.float64, 64, 64, 500, False, table) == "chunked"  # no row
    assert choose(torch.float32, 1024, 64, 500, False, table) == "chunked"


def test_default_table_respects_the_kernels_limits():
    for row in (*plan.TABLE, plan.CHUNK_ROW):
        assert row.impl in plan.IMPLEMENTATIONS
        if row.impl == "cuda-chunk":  # the chunk kernels: fp16/bf16, no gate, Dk <= 256, Dv <= 128
            assert set(row.dtypes) <= {torch.float16, torch.bfloat16}
            assert row.max_dk <= 256 and row.max_dv <= 128 and not row.gated_ok
    for rule in ("sum", "delta"):
        assert choose(torch.float32, 64, 64, 4096, True, rule=rule) == "cuda"
        assert choose(torch.bfloat16, 64, 64, 4096, True, rule=rule) == "cuda"  # gated: sequential kernel
        assert choose(torch.bfloat16, 1024, 64, 4096, False, rule=rule) == "chunked"
    assert plan.CHUNK_ROW not in plan.TABLE  # not chosen before a GPU run measured it


def test_describe_reads_the_tensors():
    q = torch.zeros(2, 3, 1000, 64, dtype=torch.bfloat16)
    v = torch.zeros(2, 3, 1000, 32, dtype=torch.bfloat16)
    assert describe("sum", q, v) == Call("sum", 1000, 64, 32, torch.bfloat16, "cpu", False)
    assert describe("delta", q, v, torch.zeros(2, 3, 64, 32), True, g=torch.zeros(2, 3, 1000)) == Call(
        "delta", 1000, 64, 32, torch.bfloat16, "cpu", False, gated=True, initial_state=True,
        output_final_state=True)


def test_unknown_implementation_in_a_table_is_an_error():
    with pytest.raises(ValueError, match="unknown implementation"):
        choose(torch.float32, 8, 8, 8, False, (Row("magic", (torch.float32,), 8, 8),))
