"""impl="auto" on a GPU: which implementation a call takes, from a small table.

Each row names the calls it takes (input dtypes, largest Dk and Dv, shortest T, whether a forget
gate is allowed) and the implementation: "cuda-chunk" (the chunkwise tensor-core kernels,
cuda_chunk.py), "cuda" (the sequential CUDA recurrence) or "chunked" (the PyTorch chunk form).
The first row that matches wins; no row matching means "chunked".

PLACEHOLDER values: the rows below (CHUNK_ROW is not in TABLE yet) follow the kernels' limits and a guess (tensor cores pay off
once a sequence holds a few chunks); the crossovers are to be set from GPU measurements
(benchmarks/gpu_ops.py), which no run has made yet.
"""
from typing import NamedTuple

from . import cuda_backend, cuda_chunk


class Row(NamedTuple):
    impl: str
    dtypes: tuple
    max_dk: int
    max_dv: int
    min_t: int = 1
    gated_ok: bool = False


# The kernels' own limits bound the rows; min_t is the placeholder crossover. The chunk kernels
# have not run on a GPU yet: CHUNK_ROW joins TABLE (first) once a GPU run has checked them and set
# min_t from benchmarks/gpu_ops.py --suite chunk; until then auto takes the sequential kernel.
CHUNK_ROW = Row("cuda-chunk", cuda_chunk.GPU_DTYPES, cuda_chunk.KEY_SIZES[-1], cuda_chunk.MAX_DV, min_t=128)
TABLE = (
    Row("cuda", cuda_backend.DTYPES, cuda_backend.MAX_DK, cuda_backend.MAX_DV, gated_ok=True),
)
IMPLS = ("cuda-chunk", "cuda", "chunked")


def choose(dtype, Dk, Dv, T, gated, table=TABLE):
    """The implementation for a call on a GPU where the CUDA extension is available."""
    for row in table:
        if row.impl not in IMPLS:
            raise ValueError(f"auto_rule: unknown implementation {row.impl!r} (one of {IMPLS})")
        if (dtype in row.dtypes and Dk <= row.max_dk and Dv <= row.max_dv and T >= row.min_t
                and (row.gated_ok or not gated)):
            return row.impl
    return "chunked"


def choose_for(q, v, g=None, table=TABLE):
    """choose() for tensors q (B, H, T, Dk), v (B, H, T, Dv) and an optional gate g."""
    return choose(q.dtype, q.shape[-1], v.shape[-1], q.shape[2], g is not None, table)
