"""benchmarks/attention_order.py on tiny shapes: every table is written, and the layer with the
order choice switched off (its "state order" column) computes what the layer computes."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "attention_order_bench", os.path.join(ROOT, "benchmarks", "attention_order.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tables_on_tiny_shapes(tmp_path):
    pytest.importorskip("fairseq")
    bench = _load()
    bench.main(["--batch", "2", "--length", "5", "--embed-dim", "16", "--heads", "2", "--steps", "1", "3",
                "--reps", "1", "--out", str(tmp_path / "ao")])
    text = (tmp_path / "ao.md").read_text()
    assert "| dpfp nu=2 | 32 | causal delta |" in text
    assert "| linear | 8 | delta | 3 |" in text
    assert "| fairseq softmax causal |" in text and "| dpfp nu=2 causal sum | 32 |" in text


@pytest.mark.parametrize("name", ["dpfp nu=2 non-causal", "linear causal sum", "linear causal delta"])
def test_state_order_layer_matches_the_layer(name):
    pytest.importorskip("fairseq")
    import fwp_fairseq
    fwp_fairseq.register()
    from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention
    bench = _load()
    torch.manual_seed(0)
    a = FastWeightAttention(16, 2, self_attention=True, **bench.LAYERS[name]).double()
    x = torch.randn(7, 3, 16, dtype=torch.float64)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:], mask[1, :2] = True, True
    ref = a(x, x, x, key_padding_mask=mask)[0]
    with bench.state_order_forced():
        out = a(x, x, x, key_padding_mask=mask)[0]
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-10
    assert a(x, x, x, key_padding_mask=mask)[0].equal(ref)  # the choice is back on afterwards
