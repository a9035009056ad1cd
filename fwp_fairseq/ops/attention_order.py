"""Which association order is cheaper: phi(Q) (phi(K)^T V) (the state order) or (phi(Q) phi(K)^T) V
(the attention order, quadratic in T). Both give the same outputs (Schlag et al. 2021, arXiv
2102.11174, section 2: linear attention is the sum-rule fast weight memory).

The rule is a count of multiply-adds in the forward products, per batch element and head, of the
implementation that runs in each order. The backward of a product A @ B is two products of the
same size (dA = dC B^T, dB = A^T dC), so a forward+backward count scales both orders alike and
the forward count decides. Counts, with Dk = d_dot (the feature dimension) and Dv = head dim:

  non-causal (noncausal.py)     state:  (Tq + Tk) Dk Dv           K^T V, then Q S
                                quadratic: Tq Tk (Dk + Dv)        Q K^T, then (Q K^T) V
  causal sum (sum_rule/chunked) state, chunks of C = min(T, 64), Tp = T padded to chunks:
                                Tp C (Dk + Dv) + 2 Tp Dk Dv       (Q S_0 is computed even for S_0 = 0)
                                quadratic: T^2 (Dk + Dv)          (quadratic.py)
  causal delta                  state: Tp C (3 Dk + 2 Dv) + 3 Tp Dk Dv + Tp C^2 / 3
                                quadratic: T^2 (2 Dk + 1.5 Dv)    (the triangular solve is T^2 Dv / 2)

So the attention order wins while T is small against Dk Dv / (Dk + Dv): 51 for DPFP nu=2 on
64-dim heads (d_dot 256), 32 for 64-dim linear features. For the causal rules without an initial
state the single-chunk state order already pays the quadratic products, so the attention order
always wins up to T = 64 and further up to T ~ 64 + 2 Dk Dv / (Dk + Dv). It needs no state in and
none out: a carried state or incremental decoding keeps the state order (or factored_state.py).

Decoding (factored_state.py) keeps S = K^T U as its factors K (t x Dk) and U (t x Dv) while
t (Dk + Dv) < Dk Dv: below that the factors are smaller than S, and every per-step operation
(read q S, the delta rule's k^T S, appending, beam-search reordering) costs in proportion to the
size of what is stored, with the same number of passes in either form (read + append + reorder for
the sum rule, one more read for the delta rule). So one inequality bounds the memory and picks the
cheaper step. For encoder-decoder attention the keys are all there at the first step: the
factored form also saves building S (Tk Dk Dv), so it is the cheaper one for any number of steps
when Tk (Dk + Dv) < Dk Dv. Folding K^T U into S costs t Dk Dv once, about t matrix-form steps.
On a CPU (benchmarks/attention_order.py, one thread) the per-step times cross later than this
size rule says, at 1.5-2x its t, since updating and copying the large S costs more per entry than
appending rows: the rule errs towards memory, never holding more than S.
"""
from ._chunking import pick_chunk_size

ORDERS = ("auto", "state", "quadratic")
CHUNK = 64  # the chunk size of sum_rule/chunked.py and delta_rule/chunked.py


def check_order(order):
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")


def noncausal_flops(Tq, Tk, Dk, Dv):
    """Forward multiply-adds per batch element and head: {"state": ..., "quadratic": ...}."""
    return {"state": (Tq + Tk) * Dk * Dv, "quadratic": Tq * Tk * (Dk + Dv)}


def causal_flops(rule, T, Dk, Dv, chunk=CHUNK):
    """Forward multiply-adds per batch element and head of the chunked state order and of the
    attention order, for rule "sum" or "delta" (see the module docstring)."""
    if rule not in ("sum", "delta"):
        raise ValueError(f"rule: expected 'sum' or 'delta', got {rule!r}")
    C = pick_chunk_size(T, chunk)
    Tp = -(-T // C) * C
    if rule == "sum":
        return {"state": Tp * C * (Dk + Dv) + 2 * Tp * Dk * Dv, "quadratic": T * T * (Dk + Dv)}
    return {"state": Tp * C * (3 * Dk + 2 * Dv) + 3 * Tp * Dk * Dv + Tp * C * C / 3,
            "quadratic": T * T * (2 * Dk + 1.5 * Dv)}


def _cheaper(flops):
    return "quadratic" if flops["quadratic"] < flops["state"] else "state"


def noncausal_order(Tq, Tk, Dk, Dv, output_final_state=False, order="auto"):
    """The order to run non-causal attention in; the state order when the state is wanted."""
    check_order(order)
    if order == "quadratic" and output_final_state:
        raise ValueError("order: 'quadratic' holds no state, but output_final_state was asked for")
    if order != "auto":
        return order
    return "state" if output_final_state else _cheaper(noncausal_flops(Tq, Tk, Dk, Dv))


def causal_order(rule, T, Dk, Dv, initial_state=False, output_final_state=False, order="auto"):
    """The order to run causal attention in. The attention order holds no state: it is only
    picked (and only allowed) without an initial state and without a final state."""
    check_order(order)
    stateful = initial_state or output_final_state
    if order == "quadratic" and stateful:
        raise ValueError("order: 'quadratic' holds no state; it cannot take initial_state "
                         "nor give output_final_state")
    if order != "auto":
        return order
    return "state" if stateful else _cheaper(causal_flops(rule, T, Dk, Dv))


def keep_factored(steps, Dk, Dv):
    """Whether a state written by `steps` keys is kept as its factors (K, U) rather than S."""
    return steps * (Dk + Dv) < Dk * Dv
