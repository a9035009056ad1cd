"""How a call runs: its association order and its implementation, decided here and nowhere else.

Two association orders give the same outputs (Schlag et al. 2021, arXiv 2102.11174, section 2:
linear attention is the sum-rule fast weight memory): the state order phi(Q) (phi(K)^T V) and
the attention order (phi(Q) phi(K)^T) V, quadratic in T. IMPLEMENTATIONS is the one list of what
can run a causal call; the user names "auto" or one of those with `user=True` (IMPLS), and
impl="auto" walks TABLE: the first row whose conditions the call meets wins, no row -> "chunked".
Non-causal attention has one implementation and only an order (noncausal_order); a decoding
state picks its stored form (keep_factored).

Where the numbers come from:

- The attention order's rule (causal_order, noncausal_order) is a count of multiply-adds in the
  forward products, per batch element and head, of the implementation that runs in each order.
  The backward of a product A @ B is two products of the same size (dA = dC B^T, dB = A^T dC),
  so a forward+backward count scales both orders alike and the forward count decides. With
  Dk = d_dot (the feature dimension) and Dv = head dim:

    non-causal (noncausal.py)      state:  (Tq + Tk) Dk Dv           K^T V, then Q S
                                   quadratic: Tq Tk (Dk + Dv)        Q K^T, then (Q K^T) V
    causal sum (sum_rule/chunked)  state, chunks of C = min(T, CHUNK), Tp = T padded to chunks:
                                   Tp C (Dk + Dv) + 2 Tp Dk Dv       (Q S_0 is computed even for S_0 = 0)
                                   quadratic: T^2 (Dk + Dv)          (quadratic.py)
    causal delta                   state: Tp C (3 Dk + 2 Dv) + 3 Tp Dk Dv + Tp C^2 / 3
                                   quadratic: T^2 (2 Dk + 1.5 Dv)    (the triangular solve is T^2 Dv / 2)

  So the attention order wins while T is small against Dk Dv / (Dk + Dv): 51 for DPFP nu=2 on
  64-dim heads (d_dot 256), 32 for 64-dim linear features. For the causal rules without an
  initial state the single-chunk state order already pays the quadratic products, so the
  attention order always wins up to T = CHUNK and further up to T ~ CHUNK + 2 Dk Dv / (Dk + Dv).
  It needs no state in and none out. Measured on a CPU, one thread, by
  `python benchmarks/attention_order.py --reps 3 --steps 1 16 48` (benchmarks/README.md, "The
  association order at translation lengths"): the layer is 1.2-2.3x faster as picked. On a GPU
  the same count is a placeholder until measured there.
- Decoding (factored_state.py) keeps S = K^T U as its factors K (t x Dk) and U (t x Dv) while
  t (Dk + Dv) < Dk Dv: below that the factors are smaller than S, and every per-step operation
  (read q S, the delta rule's k^T S, appending, beam-search reordering) costs in proportion to
  the size of what is stored, with the same number of passes in either form. So one inequality
  bounds the memory and picks the cheaper step. For encoder-decoder attention the keys are all
  there at the first step: the factored form also saves building S (Tk Dk Dv). Folding K^T U
  into S costs t Dk Dv once, about t matrix-form steps. On a CPU (the same benchmark command) the
  per-step times cross at 1.5-2x this t, since updating and copying the large S costs more per
  entry than appending rows: the rule errs towards memory, never holding more than S.
- The kernel rows of TABLE follow the kernels' own limits (dtypes, largest Dk and Dv); their
  order against the attention order and their crossovers are placeholders until measured on a
  GPU (benchmarks/gpu_ops.py; no GPU run has measured them yet). Each row says so in `source`.
"""
import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from . import cuda_backend, cuda_chunk
from ._chunking import CHUNK, pick_chunk_size

ORDERS = ("auto", "state", "quadratic")
RULES = ("sum", "delta")


class Implementation(NamedTuple):
    order: str  # "state" or "quadratic"
    user: bool  # a value of impl= (and --fwp-impl); otherwise only impl="auto" picks it
    kernel: bool  # needs CUDA tensors and the compiled extension (cuda_backend.available())
    what: str


IMPLEMENTATIONS = {
    "reference": Implementation("state", True, False, "step by step (sum_rule/, delta_rule/reference.py)"),
    "chunked": Implementation("state", True, False, "chunkwise PyTorch (sum_rule/, delta_rule/chunked.py)"),
    "cuda": Implementation("state", True, True, "the sequential CUDA recurrence (cuda_backend.py)"),
    "cuda-chunk": Implementation("state", False, True, "the chunkwise tensor-core kernels (cuda_chunk.py)"),
    "quadratic": Implementation("quadratic", False, False, "the attention order (quadratic.py)"),
}
# What a user may name: "auto" and the implementations with user=True.
IMPLS = ("auto",) + tuple(name for name, i in IMPLEMENTATIONS.items() if i.user)


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")


# -- the attention order -----------------------------------------------------------------------
def noncausal_flops(Tq: int, Tk: int, Dk: int, Dv: int) -> dict:
    """Forward multiply-adds per batch element and head: {"state": ..., "quadratic": ...}."""
    return {"state": (Tq + Tk) * Dk * Dv, "quadratic": Tq * Tk * (Dk + Dv)}


def causal_flops(rule: str, T: int, Dk: int, Dv: int, chunk: int = CHUNK) -> dict:
    """Forward multiply-adds per batch element and head of the chunked state order and of the
    attention order, for rule "sum" or "delta" (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"rule: expected 'sum' or 'delta', got {rule!r}")
    C = pick_chunk_size(T, chunk)
    Tp = -(-T // C) * C
    if rule == "sum":
        return {"state": Tp * C * (Dk + Dv) + 2 * Tp * Dk * Dv, "quadratic": T * T * (Dk + Dv)}
    return {"state": Tp * C * (3 * Dk + 2 * Dv) + 3 * Tp * Dk * Dv + Tp * C * C / 3,
            "quadratic": T * T * (2 * Dk + 1.5 * Dv)}


def _cheaper(flops: dict) -> str:
    return "quadratic" if flops["quadratic"] < flops["state"] else "state"


def noncausal_order(Tq: int, Tk: int, Dk: int, Dv: int, output_final_state: bool = False,
                    order: str = "auto") -> str:
    """The order non-causal attention runs in: the cheaper one by the flop count, the state order
    when the state is wanted.

    Args:
        Tq, Tk: query and key lengths. Dk, Dv: feature and value dimensions.
        output_final_state: the caller wants S (B, H, Dk, Dv), which only the state order forms.
        order: "auto", or "state" / "quadratic" to force one (checked against the state wanted).
    Returns:
        "state" or "quadratic".
    Example:
        >>> noncausal_order(15, 15, 256, 64)
        'quadratic'
    """
    check_order(order)
    if order == "quadratic" and output_final_state:
        raise ValueError("order: 'quadratic' holds no state, but output_final_state was asked for")
    if order != "auto":
        return order
    return "state" if output_final_state else _cheaper(noncausal_flops(Tq, Tk, Dk, Dv))


def causal_order(rule: str, T: int, Dk: int, Dv: int, initial_state: bool = False,
                 output_final_state: bool = False, order: str = "auto") -> str:
    """The cheaper order for a causal call by the flop count (measured on a CPU; see the module
    docstring). The attention order holds no state: it is only picked (and only allowed)
    without an initial state and without a final state. impl="auto" weighs this against the
    CUDA kernels in TABLE (decide).

    Args:
        rule: "sum" or "delta". T: sequence length. Dk, Dv: feature and value dimensions.
        initial_state, output_final_state: whether a state comes in or is wanted out.
        order: "auto", or "state" / "quadratic" to force one.
    Returns:
        "state" or "quadratic".
    Example:
        >>> causal_order("delta", 15, 256, 64), causal_order("delta", 4096, 64, 64)
        ('quadratic', 'state')
    """
    check_order(order)
    stateful = initial_state or output_final_state
    if order == "quadratic" and stateful:
        raise ValueError("order: 'quadratic' holds no state; it cannot take initial_state "
                         "nor give output_final_state")
    if order != "auto":
        return order
    return "state" if stateful else _cheaper(causal_flops(rule, T, Dk, Dv))


def keep_factored(steps: int, Dk: int, Dv: int) -> bool:
    """Whether a decoding state written by `steps` keys is kept as its factors K (steps x Dk) and
    U (steps x Dv) rather than as S (Dk x Dv): while the factors are smaller.

    Args:
        steps: keys written so far. Dk, Dv: feature and value dimensions.
    Returns:
        True to keep the factors, False to fold them into S.
    Example:
        >>> keep_factored(51, 256, 64), keep_factored(52, 256, 64)
        (True, False)
    """
    return steps * (Dk + Dv) < Dk * Dv


# -- the implementation ------------------------------------------------------------------------
class Call(NamedTuple):
    """What decides how a causal call runs (no tensors: tests build it by hand)."""
    rule: str  # "sum" or "delta"
    T: int
    Dk: int
    Dv: int
    dtype: torch.dtype
    device: str = "cpu"  # the tensors' device type, "cpu" or "cuda"
    kernels: bool = False  # the compiled CUDA extension can run here (cuda_backend.available())
    gated: bool = False  # a forget gate g is given
    initial_state: bool = False
    output_final_state: bool = False

    @property
    def stateful(self) -> bool:
        return self.initial_state or self.output_final_state


class Plan(NamedTuple):
    order: str  # "state" or "quadratic"
    impl: str  # a key of IMPLEMENTATIONS


class Row(NamedTuple):
    """One rule of impl="auto": the implementation, the calls it takes, where its numbers come from."""
    impl: str
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: any
    max_dk: float = math.inf
    max_dv: float = math.inf
    min_t: int = 1
    gated_ok: bool = False
    max_t: float = math.inf
    rules: Tuple[str, ...] = RULES
    stateful_ok: bool = True
    when: Optional[Callable[[Call], bool]] = None  # a further condition on the call
    source: str = ""


def _flop_rule_picks_attention_order(call: Call) -> bool:
    # causal_order looked up at call time: benchmarks/attention_order.py switches it off.
    return causal_order(call.rule, call.T, call.Dk, call.Dv) == "quadratic"


KERNEL_LIMITS = dict(dtypes=cuda_backend.DTYPES, max_dk=cuda_backend.MAX_DK, max_dv=cuda_backend.MAX_DV,
                     gated_ok=True)
ONE_STEP = Row("reference", max_t=1, gated_ok=True,
               source="no number: one decoding step is one update; the chunk machinery would only add work")
# Why the kernel comes first for the delta rule (a reason, not a measurement): its attention order
# solves a T x T triangular system in fp32 (quadratic.py), a substitution rather than a batched
# product, on inputs upcast from half; the sequential kernel reads the inputs as they are.
KERNEL_DELTA = Row("cuda", rules=("delta",), **KERNEL_LIMITS,
                   source="placeholder until measured on a GPU (benchmarks/gpu_ops.py): the kernel is "
                          "put before the attention order's triangular solve, its limits are the kernel's")
ATTENTION_ORDER = Row("quadratic", stateful_ok=False, when=_flop_rule_picks_attention_order,
                      source="the flop count of causal_order, measured on a CPU (1 thread): "
                             "python benchmarks/attention_order.py --reps 3 --steps 1 16 48 "
                             "(benchmarks/README.md); on a GPU a placeholder until measured there")
KERNEL = Row("cuda", **KERNEL_LIMITS,
             source="placeholder until measured on a GPU (benchmarks/gpu_ops.py): every call within "
                    "the sequential kernel's limits (cuda_backend.supports) that the rows above leave")
# The chunk kernels have not run on a GPU yet: CHUNK_ROW joins TABLE (before KERNEL_DELTA) once a
# GPU run has checked them and set min_t from benchmarks/gpu_ops.py --suite chunk.
CHUNK_ROW = Row("cuda-chunk", cuda_chunk.GPU_DTYPES, cuda_chunk.KEY_SIZES[-1], cuda_chunk.MAX_DV, min_t=128,
                source="placeholder until measured on a GPU: min_t = 128 guesses where tensor cores pay "
                       "off (a few chunks); the limits are the chunk kernels' (cuda_chunk.supports)")
TABLE = (ONE_STEP, KERNEL_DELTA, ATTENTION_ORDER, KERNEL)


def _takes(row: Row, call: Call) -> bool:
    if row.impl not in IMPLEMENTATIONS:
        raise ValueError(f"plan: unknown implementation {row.impl!r} (one of {tuple(IMPLEMENTATIONS)})")
    if IMPLEMENTATIONS[row.impl].kernel and not (call.device == "cuda" and call.kernels):
        return False
    return (call.rule in row.rules and (row.dtypes is None or call.dtype in row.dtypes)
            and call.Dk <= row.max_dk and call.Dv <= row.max_dv and row.min_t <= call.T <= row.max_t
            and (row.gated_ok or not call.gated) and (row.stateful_ok or not call.stateful)
            and (row.when is None or row.when(call)))


def decide(call: Call, impl: str = "auto", table: Tuple[Row, ...] = TABLE) -> Plan:
    """The order and implementation of a causal call: `impl` itself when named, else the first
    row of `table` that takes the call, else "chunked"."""
    check_impl(impl)
    if impl == "auto":
        impl = next((row.impl for row in table if _takes(row, call)), "chunked")
    return Plan(IMPLEMENTATIONS[impl].order, impl)


def describe(rule: str, q: torch.Tensor, v: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
             output_final_state: bool = False, g: Optional[torch.Tensor] = None) -> Call:
    """The Call of tensors q (B, H, T, Dk), v (B, H, T, Dv) and the optional state and gate."""
    # Probing may build the extension once (about a minute); never for CPU tensors.
    kernels = q.is_cuda and cuda_backend.available()[0]
    return Call(rule, q.shape[2], q.shape[3], v.shape[3], q.dtype, q.device.type, kernels,
                g is not None, initial_state is not None, bool(output_final_state))
