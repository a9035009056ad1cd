"""The math core of fwp_fairseq: fast-weight recurrences in plain PyTorch (no fairseq import).

    fast_weight_sum(q, k, v, initial_state=None, output_final_state=False, impl="auto", g=None)
    fast_weight_delta(q, k, v, beta, initial_state=None, output_final_state=False, impl="auto", g=None)
    fast_weight_delta_product(q, k, v, beta, num_householder, initial_state=None,
                              output_final_state=False, impl="auto", g=None)
        (DeltaProduct: num_householder delta-rule writes per token; k, v, beta have T*N steps)
    fast_weight_noncausal(q, k, v, key_padding_mask=None, output_final_state=False, order="auto")
    FactoredState: a decoding state kept as its written keys and values while smaller than S

q, k: (B, H, T, Dk) already feature-mapped; v: (B, H, T, Dv); beta, g: (B, H, T);
state: (B, H, Dk, Dv). Each returns (o, final_state); final_state is None unless asked for.
plan.py decides how a call runs: with impl="auto" the order (the state order, or the attention
order sum_rule_quadratic / delta_rule_quadratic when no state goes in or out) and the
implementation; non-causal attention picks its order by noncausal_order; FactoredState folds
by keep_factored.

UPDATES names the update rules (one op each), IMPLS the values of `impl`;
accumulation_dtype(dtype) is the dtype the state accumulates in.
"""
from ._checks import accumulation_dtype
from .delta_product import fast_weight_delta_product
from .dispatch import cuda_available, fast_weight_delta, fast_weight_sum
from .factored_state import FactoredState
from .noncausal import fast_weight_noncausal, fast_weight_read, fast_weight_state
from .plan import IMPLS, causal_order, keep_factored, noncausal_order
from .quadratic import delta_rule_quadratic, sum_rule_quadratic

UPDATES = ("sum", "delta")  # fast_weight_sum, fast_weight_delta

__all__ = [
    "fast_weight_sum",
    "fast_weight_delta",
    "fast_weight_delta_product",
    "fast_weight_noncausal",
    "fast_weight_state",
    "fast_weight_read",
    "FactoredState",
    "sum_rule_quadratic",
    "delta_rule_quadratic",
    "causal_order",
    "noncausal_order",
    "keep_factored",
    "cuda_available",
    "accumulation_dtype",
    "IMPLS",
    "UPDATES",
]
