"""fast_weight_delta_product (DeltaProduct): the step loop against the Householder-product form,
every impl against the step loop (outputs, final state, every gradient; with and without gate
and initial state; N in 1..3), N = 1 against fast_weight_delta, decoding one token at a time,
and the errors of bad shapes."""
import functools

import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_delta_product

from helpers import log_decay, make_inputs, rel_err, run_with_grads

# Against the fp64 step loop: fp64 tight; fp32 as the gated delta rule's chunked tests (the
# chunked form's triangular solve and state products round at ~1e-7 each, over T*N <= 200 steps
# of a contractive recurrence (sum-normalised keys, beta in (0, 1))).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def inputs(B, H, T, N, Dk, Dv, dtype=torch.float64, with_state=False, gated=False, seed=0):
    """Leaf tensors q (B, H, T, Dk), k, v, beta over T*N writes, state or None, g (B, H, T) or None."""
    _, k, v, beta, state = make_inputs(B, H, T * N, Dk, Dv, dtype=dtype, seed=seed, with_state=with_state)
    q = make_inputs(B, H, T, Dk, Dv, dtype=dtype, seed=seed + 100)[0]
    g = log_decay(B, H, T, dtype=dtype, seed=seed + 7) if gated else None
    return q, k, v, beta, state, g


def product_fn(n):
    """fast_weight_delta_product with N bound, called as run_with_grads calls a rule."""
    def fn(q, k, v, beta, **kw):
        return fast_weight_delta_product(q, k, v, beta, n, **kw)
    return fn


def test_reference_is_a_product_of_householder_matrices():
    """S_t = a_t prod_j (I - beta_j k_j k_j^T) S_{t-1} + the writes, j in token order; o_t = S_t^T q_t."""
    B, H, T, N, Dk, Dv = 1, 2, 9, 3, 4, 3
    q, k, v, beta, state, g = inputs(B, H, T, N, Dk, Dv, with_state=True, gated=True)
    q, k, v, beta, state, g = (x.detach() for x in (q, k, v, beta, state, g))
    beta = 2 * beta  # beta in (0, 2) as the models use it
    eye = torch.eye(Dk, dtype=q.dtype)
    S, outs = state, []
    for t in range(T):
        S = g[:, :, t, None, None].exp() * S
        for i in range(t * N, t * N + N):
            ki, bi = k[:, :, i, :, None], beta[:, :, i, None, None]
            S = (eye - bi * ki @ ki.transpose(-1, -2)) @ S + bi * ki @ v[:, :, i, None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    o, S_ref = fast_weight_delta_product(q, k, v, beta, N, state, True, impl="reference", g=g)
    assert rel_err(o, torch.stack(outs, 2)) < 1e-12 and rel_err(S_ref, S) < 1e-12


# auto runs chunked, the attention order (quadratic.py) or, for one token, the step loop: fp64 only.
@pytest.mark.parametrize("impl, dtype", [("chunked", torch.float64), ("chunked", torch.float32),
                                         ("auto", torch.float64)])
@pytest.mark.parametrize("N", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 1, 5, 3), (2, 3, 7, 8, 12), (1, 2, 40, 16, 8)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_the_step_loop(impl, dtype, N, shape, with_state, gated):
    B, H, T, Dk, Dv = shape
    q, k, v, beta, state, g = inputs(B, H, T, N, Dk, Dv, dtype=dtype, with_state=with_state, gated=gated)
    as64 = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, beta, state, g)]
    ref = run_with_grads(product_fn(N), *as64[:5], "reference", log_g=as64[5])  # the exact answer
    got = run_with_grads(product_fn(N), q, k, v, beta, state, impl, log_g=g)
    names = (["o", "final_state", "dq", "dk", "dv", "dbeta"] + (["dstate"] if with_state else [])
             + (["dg"] if gated else []))
    assert len(got) == len(names)
    for name, a, b in zip(names, got, ref):
        assert a.dtype == dtype and a.shape == b.shape, name
        if not b.abs().max() > 0:  # one token from a zero state: g decays nothing, dg is exactly 0
            assert a.abs().max() < TOL[dtype], (name, a)
            continue
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("N", [2, 3])
def test_reflections_match_the_step_loop(N):
    """Unit keys and beta in (0, 2) (the state-tracking setting: not contractive), fp64."""
    q, k, v, beta, state, g = inputs(2, 2, 30, N, 6, 5, with_state=True, gated=True)
    unit = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_()
    beta2 = (2 * beta.detach()).requires_grad_()
    ref = run_with_grads(product_fn(N), q, unit, v, beta2, state, "reference", log_g=g)
    got = run_with_grads(product_fn(N), q, unit, v, beta2, state, "chunked", log_g=g)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("impl", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 20, 70])
def test_one_householder_is_the_delta_rule(impl, gated, T):
    """N = 1: the same computation as fast_weight_delta, bit for bit (outputs, state, gradients)."""
    q, k, v, beta, state, g = inputs(2, 2, T, 1, 8, 4, dtype=torch.float32, with_state=True, gated=gated)
    got = run_with_grads(product_fn(1), q, k, v, beta, state, impl, log_g=g)
    want = run_with_grads(fast_weight_delta, q, k, v, beta, state, impl, log_g=g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gated", [False, True])
def test_decoding_one_token_at_a_time(gated):
    """T = 1 calls with N writes each, the state carried, equal one call over the sequence."""
    N, T = 2, 12
    q, k, v, beta, state, g = inputs(2, 3, T, N, 5, 4, with_state=True, gated=gated, seed=3)
    full, S_full = fast_weight_delta_product(q, k, v, beta, N, state, True, g=g)
    S, outs = state, []
    for t in range(T):
        w = slice(t * N, t * N + N)
        gt = None if g is None else g[:, :, t:t + 1]
        o, S = fast_weight_delta_product(q[:, :, t:t + 1], k[:, :, w], v[:, :, w], beta[:, :, w], N, S, True, g=gt)
        outs.append(o)
    assert rel_err(torch.cat(outs, 2), full) < 1e-12 and rel_err(S, S_full) < 1e-12


def test_gradcheck():
    """The step loop's gradients (autograd) against finite differences; the fast paths are
    checked against the step loop's gradients above."""
    q, k, v, beta, state, g = inputs(1, 2, 5, 2, 4, 3, with_state=True, gated=True)

    def fn(q, k, v, beta, state, g):
        o, S = fast_weight_delta_product(q, k, v, beta, 2, state, True, impl="reference", g=g)
        return torch.cat([o.flatten(), S.flatten()])

    assert torch.autograd.gradcheck(fn, (q, k, v, beta, state, g))


def _bad(**changes):
    B, H, T, N, Dk, Dv = 2, 3, 4, 2, 5, 6
    args = dict(q=torch.rand(B, H, T, Dk), k=torch.rand(B, H, T * N, Dk), v=torch.rand(B, H, T * N, Dv),
                beta=torch.rand(B, H, T * N), num_householder=N, initial_state=None, g=None)
    args.update(changes)
    return functools.partial(fast_weight_delta_product, **args)


@pytest.mark.parametrize("changes, match", [
    (dict(num_householder=0), "^num_householder: expected an int >= 1"),
    (dict(num_householder=2.0), "^num_householder: expected an int >= 1"),
    (dict(k=torch.rand(2, 3, 4, 5)), r"^k: expected shape \(2, 3, 8, 5\) \(B, H, T \* num_householder"),
    (dict(k=torch.rand(2, 3, 8, 4)), r"^k: expected shape \(2, 3, 8, 5\)"),
    (dict(v=torch.rand(2, 3, 4, 6)), r"^v: expected shape \(2, 3, 8, Dv\)"),
    (dict(beta=torch.rand(2, 3, 4)), r"^beta: expected shape \(2, 3, 8\)"),
    (dict(beta=None), r"^beta: DeltaProduct needs beta of shape \(2, 3, 8\)"),
    (dict(g=-torch.rand(2, 3, 8)), r"^g: expected shape \(2, 3, 4\)"),
    (dict(g=torch.rand(2, 3, 4) + 0.1), r"^g: expected finite log-decays <= 0"),
    (dict(initial_state=torch.rand(2, 3, 6, 5)), r"^initial_state: expected shape \(2, 3, 5, 6\)"),
    (dict(q=torch.rand(2, 3, 4, 5, dtype=torch.float64)), "^k: expected dtype torch.float64"),
    (dict(impl="fast"), "^impl: expected one of"),
])
def test_bad_inputs_name_the_argument(changes, match):
    impl = changes.pop("impl", "auto")
    with pytest.raises(ValueError, match=match):
        _bad(**changes)(impl=impl)


def test_cuda_impl_needs_cuda_tensors():
    """impl="cuda" runs the CUDA delta rule over the T*N writes: on CPU tensors, fast_weight_delta's error."""
    q, k, v, beta, _, _ = inputs(1, 1, 3, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="^impl: 'cuda' needs CUDA tensors"):
        fast_weight_delta_product(q, k, v, beta, 2, impl="cuda")


def test_docstring_example_runs():
    import doctest

    import fwp_fairseq.ops.delta_product as module
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
