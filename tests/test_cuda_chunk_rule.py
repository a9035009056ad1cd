"""The table-driven impl="auto" rule (fwp_fairseq/ops/auto_rule.py): its mechanism, not its
placeholder values."""
import pytest
import torch

from fwp_fairseq.ops import auto_rule
from fwp_fairseq.ops.auto_rule import Row, choose, choose_for


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
    for row in (*auto_rule.TABLE, auto_rule.CHUNK_ROW):
        assert row.impl in auto_rule.IMPLS
        if row.impl == "cuda-chunk":  # the chunk kernels: fp16/bf16, no gate, Dk <= 256, Dv <= 128
            assert set(row.dtypes) <= {torch.float16, torch.bfloat16}
            assert row.max_dk <= 256 and row.max_dv <= 128 and not row.gated_ok
    assert choose(torch.float32, 64, 64, 4096, True) == "cuda"
    assert choose(torch.bfloat16, 64, 64, 4096, True) == "cuda"  # gated: sequential kernel
    assert choose(torch.bfloat16, 1024, 64, 4096, False) == "chunked"
    assert auto_rule.CHUNK_ROW not in auto_rule.TABLE  # not chosen before a GPU run measured it


def test_choose_for_reads_the_tensors():
    q = torch.zeros(2, 3, 1000, 64, dtype=torch.bfloat16)
    assert choose_for(q, q) == choose(torch.bfloat16, 64, 64, 1000, False)
    assert choose_for(q, q, g=torch.zeros(2, 3, 1000)) == choose(torch.bfloat16, 64, 64, 1000, True)


def test_unknown_implementation_in_a_table_is_an_error():
    with pytest.raises(ValueError, match="unknown implementation"):
        choose(torch.float32, 8, 8, 8, False, (Row("magic", (torch.float32,), 8, 8),))
