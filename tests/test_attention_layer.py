"""FastWeightAttention on its own: the paper's recurrences, padding, incremental state, beam
reordering, dimension checks."""
import pytest
import torch

pytest.importorskip("fairseq")
import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402

from helpers import check_decoding_buffer  # noqa: E402

E, H = 16, 2


def layer(**kw):
    torch.manual_seed(0)
    kw.setdefault("self_attention", not kw.get("encoder_decoder_attention", False))
    return FastWeightAttention(E, H, **kw).double().eval()


def x_(T, B, seed=0, dim=E):
    return torch.randn(T, B, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_causal(a, x):
    """The paper's recurrences (arXiv 2102.11174, sections 3 and 4.2) written literally, one step
    at a time, W: (d_v x d_dot) per head."""
    T, B, _ = x.shape
    q = a._phi(a._heads(a.q_proj(x), B))
    k = a._phi(a._heads(a.k_proj(x), B))
    v = a._heads(a.v_proj(x), B)
    W = x.new_zeros(B, H, v.size(-1), k.size(-1))
    z = x.new_zeros(B, H, k.size(-1))
    out = []
    for t in range(T):
        kt, vt, qt = k[:, :, t], v[:, :, t], q[:, :, t]
        if a.update == "delta":
            beta = torch.sigmoid(a.beta_proj(x[t]))[..., None]  # (B, H, 1)
            v_bar = (W @ kt[..., None])[..., 0]
            if a.attn_normalize and t > 0:
                den = (z * kt).sum(-1, keepdim=True)  # 0 only where W phi(k) is 0 too
                v_bar = torch.where(den > 0, v_bar / den.clamp_min(1e-300), torch.zeros_like(v_bar))
            W = W + beta[..., None] * (vt - v_bar)[..., None] * kt[..., None, :]
        else:
            W = W + vt[..., None] * kt[..., None, :]
        z = z + kt
        y = (W @ qt[..., None])[..., 0]
        if a.attn_normalize:
            y = y / ((z * qt).sum(-1, keepdim=True) + a.eps)
        out.append(y)
    o = torch.stack(out, 2).permute(2, 0, 1, 3).reshape(T, B, E)
    return a.out_proj(o)


@pytest.mark.parametrize("kernel", ["linear", "dpfp", "performer"])
@pytest.mark.parametrize("update", ["sum", "delta"])
@pytest.mark.parametrize("norm", [False, True])
def test_causal_matches_the_papers_recurrence(kernel, update, norm):
    a = layer(causal=True, feature_map=kernel, update=update, attn_normalize=norm, performer_features=4)
    x = x_(9, 2)
    with torch.no_grad():
        got, weights = a(x, x, x)
        torch.testing.assert_close(got, naive_causal(a, x), atol=1e-9, rtol=1e-7)
    assert weights is None


@pytest.mark.parametrize("kernel", ["linear", "dpfp", "performer", "identity"])
@pytest.mark.parametrize("update", ["sum", "delta"])
def test_l2_normalised_features(kernel, update):
    """--fwp-l2-normalize: phi(k), phi(q) of unit length (instead of unit sum), the same
    recurrence, and the incremental (generation) path agrees with the full one."""
    a = layer(causal=True, feature_map=kernel, update=update, l2_norm=True, performer_features=4)
    assert a.phi_norm == "l2"
    assert a.attn_normalize == (update == "sum" and kernel != "identity")
    x = x_(9, 2)
    with torch.no_grad():
        k = a._phi(a._heads(a.k_proj(x), 2))
        torch.testing.assert_close(k.norm(dim=-1), torch.ones_like(k[..., 0]))
        full = a(x, x, x)[0]
        torch.testing.assert_close(full, naive_causal(a, x), atol=1e-9, rtol=1e-7)
        state = {}
        steps = torch.cat([a(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0] for t in range(9)])
    torch.testing.assert_close(steps, full)


def test_identity_features_are_the_projections():
    """--fwp-kernel identity: phi(x) = x, no normalisation of any kind unless asked for."""
    a = layer(causal=True, feature_map="identity", update="delta")
    assert a.phi_norm is None and not a.attn_normalize
    x = x_(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(a._phi(a._heads(a.k_proj(x), 2)), a._heads(a.k_proj(x), 2))
        torch.testing.assert_close(a(x, x, x)[0], naive_causal(a, x), atol=1e-9, rtol=1e-7)
    assert not layer(feature_map="identity").attn_normalize  # non-causal (sum rule) too


@pytest.mark.parametrize("norm", [False, True])
def test_noncausal_reads_after_all_writes(norm):
    a = layer(feature_map="linear", attn_normalize=norm)
    x = x_(6, 2)
    with torch.no_grad():
        got = a(x, x, x)[0]
        # every position sees the full sequence: the same as the causal read at the last step,
        # for every query
        B = x.size(1)
        q, k, v = a._phi(a._heads(a.q_proj(x), B)), a._phi(a._heads(a.k_proj(x), B)), a._heads(a.v_proj(x), B)
        o = q @ (k.transpose(-1, -2) @ v)
        if norm:
            o = o / ((q * k.sum(2, keepdim=True)).sum(-1, keepdim=True) + a.eps)
        ref = a.out_proj(o.permute(2, 0, 1, 3).reshape(6, B, E))
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("kind", ["causal-sum", "causal-delta", "noncausal", "cross"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(kind, side):
    if kind == "cross":
        a = layer(encoder_decoder_attention=True, feature_map="dpfp", kdim=E)
    elif kind == "noncausal":
        a = layer(feature_map="performer", performer_features=4)
    else:
        a = layer(causal=True, feature_map="linear", update=kind.split("-")[1], attn_normalize=True)
    short, long_ = x_(3, 1, 1), x_(6, 1, 2)
    pad = torch.zeros(3, 1, E, dtype=torch.float64) + 7.0  # garbage at padded positions
    padded = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = side == "left"
    mask[0, 3:] = side == "right"
    batch = torch.cat([padded, long_], 1)
    real = slice(3, 6) if side == "left" else slice(0, 3)
    with torch.no_grad():
        if kind == "cross":
            queries = x_(4, 2, 3)
            got = a(queries, batch, batch, key_padding_mask=mask, static_kv=True)[0]
            alone = a(queries[:, :1], short, short, static_kv=True)[0]
            torch.testing.assert_close(got[:, 0], alone[:, 0])
            return
        got = a(batch, batch, batch, key_padding_mask=mask)[0]
        alone = a(short, short, short)[0]
        other = a(long_, long_, long_)[0]
    torch.testing.assert_close(got[real, 0], alone[:, 0])
    torch.testing.assert_close(got[:, 1], other[:, 0])


@pytest.mark.parametrize("update", ["sum", "delta"])
def test_incremental_state_is_bounded_and_reorders(update):
    """The decoding state holds the written keys and values while smaller than S, then S: never
    more than numel(S) + numel(z), constant once folded (d_dot 32, head 8: folded at step 7)."""
    a = layer(causal=True, feature_map="dpfp", dpfp_nu=2, update=update, attn_normalize=True)
    x = x_(10, 3)
    with torch.no_grad():
        full = a(x, x, x)[0]
        state = {}
        folded, steps = [], []
        for t in range(4):
            steps.append(a(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0])
            folded.append(check_decoding_buffer(a._get_input_buffer(state)))
        # beam search: keep rows 2 and 0 (the batch shrinks), then continue
        order = torch.tensor([2, 0])
        a.reorder_incremental_state(state, order)
        for t in range(4, 10):
            xt = x[t:t + 1].index_select(1, order)
            steps.append(a(xt, xt, xt, incremental_state=state)[0])
            folded.append(check_decoding_buffer(a._get_input_buffer(state)))
    assert [f for f, _ in folded] == [False] * 6 + [True] * 4
    assert len({str(shapes) for _, shapes in folded[6:]}) == 1
    got = torch.cat([torch.cat(steps[:4]).index_select(1, order), torch.cat(steps[4:])])
    torch.testing.assert_close(got, full.index_select(1, order))


def test_cross_attention_state_built_once():
    a = layer(encoder_decoder_attention=True, feature_map="linear", kdim=12, vdim=12)
    enc = x_(5, 2, 1, dim=12)
    q = x_(3, 2, 2)
    with torch.no_grad():
        full = a(q, enc, enc, static_kv=True)[0]
        state = {}
        out0 = a(q[:1], enc, enc, incremental_state=state, static_kv=True)[0]
        other = x_(5, 2, 9, dim=12)  # ignored: the cached state from the first step is reused
        out1 = a(q[1:2], other, other, incremental_state=state, static_kv=True)[0]
        a.reorder_incremental_state(state, torch.tensor([1, 1, 0]))  # beam expansion
        out2 = a(q[2:3].index_select(1, torch.tensor([1, 1, 0])), enc, enc, incremental_state=state, static_kv=True)[0]
    torch.testing.assert_close(torch.cat([out0, out1]), full[:2])
    torch.testing.assert_close(out2[0], full[2].index_select(0, torch.tensor([1, 1, 0])))



def _decode_reordered(a, q, enc, mask, orders):
    """Encoder-decoder attention step by step from one incremental state, the batch reordered by
    orders[t] after step t as beam search does -> (outputs of each step, rows of the first batch
    each step read, the buffers after each reorder)."""
    state, rows, outs, read, buffers = {}, torch.arange(q.size(1)), [], [], []
    for t in range(q.size(0)):
        outs.append(a(q[t:t + 1, rows], enc[:, rows], enc[:, rows], key_padding_mask=mask[rows],
                      incremental_state=state, static_kv=True)[0])
        read.append(rows)
        if t < len(orders):
            a.reorder_incremental_state(state, orders[t])
            rows = rows[orders[t]]
            buffers.append(dict(a._get_input_buffer(state)))
    return outs, read, buffers


@pytest.mark.parametrize("feature_map", ["dpfp", "linear"])  # dpfp: factored memory, linear: S
def test_cross_attention_memory_shared_by_beams(feature_map):
    """Beam search (set_beam_size 3, each sentence's encoder output repeated in 3 consecutive
    rows): one encoder-decoder memory per sentence, the same tensors while beams are reordered
    within their sentences, a finished sentence drops its row, rows that mix sentences get their
    own memory again; every step equals the full forward of the rows it serves (fp64)."""
    beam = 3
    a = layer(encoder_decoder_attention=True, feature_map=feature_map, kdim=12, vdim=12)
    a.set_beam_size(beam)
    enc = x_(5, 2, 1, dim=12).repeat_interleave(beam, dim=1)  # 2 sentences x 3 beams
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[3:, 3:] = True  # the second sentence is shorter
    q = x_(4, 6, 2)
    with torch.no_grad():
        full = a(q, enc, enc, key_padding_mask=mask, static_kv=True)[0]
        within, drop = torch.tensor([2, 0, 0, 4, 5, 3]), torch.tensor([4, 3, 3])
        outs, read, buffers = _decode_reordered(a, q, enc, mask, [within, within, drop])
        for t, (out, rows) in enumerate(zip(outs, read)):
            torch.testing.assert_close(out[0], full[t, rows])
        first, second, dropped = buffers
        memory = [name for name in first if name != "fw_beam"]
        assert all(first[name].size(0) == 2 for name in memory)  # one row per sentence
        assert all(second[name] is first[name] for name in memory)  # not copied
        assert all(dropped[name].size(0) == 1 for name in memory)
        mixed = torch.tensor([0, 3, 1, 4, 2, 5])  # not what fairseq does, still exact
        outs, _, buffers = _decode_reordered(a, q[:2], enc, mask, [mixed])
        torch.testing.assert_close(outs[1][0], full[1, mixed])
        assert "fw_beam" not in buffers[0] and all(x.size(0) == 6 for x in buffers[0].values())


def test_cross_attention_memory_per_row_without_repeated_sentences():
    """set_beam_size 3 but rows that are not repeated sentences (e.g. greedy decoding of 6
    sentences after a beam search): one memory row per batch row, as without a beam."""
    a = layer(encoder_decoder_attention=True, feature_map="linear", kdim=12, vdim=12)
    a.set_beam_size(3)
    enc, q = x_(5, 6, 1, dim=12), x_(2, 6, 2)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    with torch.no_grad():
        full = a(q, enc, enc, static_kv=True)[0]
        outs, _, buffers = _decode_reordered(a, q, enc, mask, [torch.tensor([5, 0, 1, 1, 2, 3])])
    assert "fw_beam" not in buffers[0] and all(x.size(0) == 6 for x in buffers[0].values())
    torch.testing.assert_close(outs[1][0], full[1, [5, 0, 1, 1, 2, 3]])

def test_zero_features_give_no_nan():
    a = layer(causal=True, feature_map="dpfp", update="delta", attn_normalize=True)
    for p in (a.q_proj, a.k_proj):  # phi(0) = 0 for DPFP
        torch.nn.init.zeros_(p.weight)
        torch.nn.init.zeros_(p.bias)
    x = x_(5, 2)
    with torch.no_grad():
        assert torch.isfinite(a(x, x, x)[0]).all()


def test_gradients_flow_to_every_parameter():
    a = layer(causal=True, feature_map="linear", update="delta", attn_normalize=True).train()
    x = x_(7, 2)
    a(x, x, x)[0].square().sum().backward()
    for name, p in a.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=15, num_heads=2), "divisible"),
    (dict(feature_map="cosine"), "feature_map"),
    (dict(update="oja"), "update"),
    (dict(feature_map="performer", sum_norm=False), "performer features must be normalised"),
    (dict(sum_norm=True, l2_norm=True), "pick one"),
    (dict(feature_map="identity", sum_norm=True), "signed"),
    (dict(feature_map="identity", causal=True, attn_normalize=True), "signed"),
    (dict(causal=True, self_attention=False, encoder_decoder_attention=True), "causal"),
])
def test_bad_construction_is_a_clear_error(kwargs, message):
    kw = dict(embed_dim=E, num_heads=H, self_attention=True)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=message):
        FastWeightAttention(kw.pop("embed_dim"), kw.pop("num_heads"), **kw)


def test_bad_shapes_are_a_clear_error():
    a = layer(causal=True)
    x = x_(4, 2)
    with pytest.raises(ValueError, match="query"):
        a(x[..., :8], None, None)
    with pytest.raises(ValueError, match="key_padding_mask"):
        a(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key"):
        a(x, x_(4, 3), x_(4, 3))
