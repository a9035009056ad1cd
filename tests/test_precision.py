"""Mixed precision: FastWeightAttention under fp16/bf16 weights and under torch.autocast keeps phi,
the state and the normalisers in fp32 and returns the input's dtype; large activations stay
finite; fairseq-train with --bf16 / --fp16 / --amp on the CPU (what fairseq allows there).

On the CPU, fairseq's --fp16 needs --fp16-no-flatten-grads and dies at the first loss-scale
overflow (its trainer calls .cuda() there); --bf16 implies --tpu, so it runs through
scripts/train_cpu_bf16.py; --amp autocasts CUDA only, so on the CPU it trains in fp32."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention
from fwp_fairseq.modules.feature_maps import DPFPFeatureMap, FavorFeatureMap, sum_normalize
from helpers import check_decoding_buffer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(k, u) for k in ("linear", "performer", "dpfp") for u in ("sum", "delta")]
HALF = [torch.float16, torch.bfloat16]
# Relative to the fp32 output's scale: bf16 keeps 8 bits of mantissa, fp16 11.
TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2}


def layer(kernel, update, causal=True, **kw):
    torch.manual_seed(0)
    return FastWeightAttention(16, 2, self_attention=True, causal=causal, feature_map=kernel, update=update,
                               performer_features=8, **kw).eval()


def close(out, ref, dtype):
    err = (out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err < TOL[dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("kernel, update", CASES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_weights_match_fp32(kernel, update, dtype):
    """The model in half (fairseq --fp16 / --bf16): output in half, finite, close to fp32,
    finite gradients."""
    ref_layer = layer(kernel, update)
    x = torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(1))
    ref = ref_layer(x, x, x)[0].detach()
    half = layer(kernel, update).to(dtype)
    xh = x.to(dtype).requires_grad_()
    out = half(xh, xh, xh)[0]
    assert out.dtype == dtype and torch.isfinite(out).all()
    close(out, ref, dtype)
    out.float().square().sum().backward()
    assert torch.isfinite(xh.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters() if p.grad is not None)


@pytest.mark.parametrize("kernel, update", CASES)
@pytest.mark.parametrize("dtype", HALF)
def test_autocast_matches_fp32(kernel, update, dtype):
    """torch.autocast (fairseq --amp on a GPU; here the CPU's autocast): projections in half,
    the recurrence in fp32 or bf16, the result in autocast's dtype."""
    a = layer(kernel, update)
    x = torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(1))
    ref = a(x, x, x)[0].detach()
    with torch.autocast("cpu", dtype=dtype):
        out = a(x, x, x)[0]
    assert out.dtype == dtype and torch.isfinite(out).all()
    close(out, ref, dtype)


@pytest.mark.parametrize("update", ["sum", "delta"])
def test_decoding_state_and_normaliser_stay_fp32(update):
    """Every tensor of the decoding state is fp32, factored (steps 1-5) and folded (6-8: d_dot 16, head 8)."""
    a = layer("dpfp", update, attn_normalize=True).to(torch.float16)
    x = torch.randn(8, 2, 16).to(torch.float16)
    state, folded = {}, []
    for t in range(8):
        out = a(x[t:t + 1], None, None, incremental_state=state)[0]
        assert out.dtype == torch.float16
        buf = a._get_input_buffer(state)
        assert buf["fw_z"].dtype == torch.float32
        folded.append(check_decoding_buffer(buf, torch.float32)[0])
    assert not folded[0] and folded[-1]


@pytest.mark.parametrize("kernel", ["dpfp", "performer", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("causal, update", [(True, "sum"), (True, "delta"), (False, "sum")])
def test_large_activations_stay_finite(kernel, dtype, causal, update):
    """|x| ~ 1e3 entering phi: DPFP squares it (1e6 > fp16's 65504), FAVOR+ exponentiates it."""
    a = layer(kernel, update, causal=causal).to(dtype)
    with torch.no_grad():
        a.q_proj.weight.mul_(1e3 / 4)
        a.k_proj.weight.mul_(1e3 / 4)
    x = torch.randn(10, 2, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    q = a._heads(a.q_proj(x), 2)
    assert q.float().abs().max() > 500  # really |x| ~ 1e3 at phi's input
    out = a(x, x, x)[0]
    assert torch.isfinite(out).all()


def test_feature_maps_take_large_half_inputs():
    """The maps themselves compute in fp32; in fp32 (as the layer calls them) |x| ~ 1e3 is finite,
    and sum normalisation of half features whose sum overflows fp16 is finite too."""
    x = 1e3 * torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    for fmap in (DPFPFeatureMap(16, nu=2), FavorFeatureMap(16, 8)):
        assert torch.isfinite(sum_normalize(fmap(x))).all()
    big = torch.full((2, 64), 6e4, dtype=torch.float16)  # the sum, 3.8e6, is inf in fp16
    out = sum_normalize(big)
    assert out.dtype == torch.float16 and torch.allclose(out.float(), torch.full((2, 64), 1 / 64), rtol=1e-3)
    small = torch.full((2, 8), 100.0, dtype=torch.float16)  # 1e4: fits fp16 only via fp32 compute
    assert torch.isfinite(DPFPFeatureMap(4)(small)).all()


# -- fairseq-train on the CPU ------------------------------------------------------------

def _train(corpus, kernel, update, precision, updates=3):
    """fairseq-train on a tiny fwp_lm; returns the per-update losses (finite, all logged)."""
    from helpers import COMMON, TRAIN, run
    args = [corpus / "lm-bin", *COMMON, *TRAIN, "--task", "language_modeling", "--arch", "fwp_lm_tiny",
            "--fwp-kernel", kernel, "--fwp-update", update, "--fwp-performer-features", "8",
            "--tokens-per-sample", "32", "--sample-break-mode", "none", "--max-tokens", "256",
            "--max-update", str(updates), "--no-save", "--log-format", "json"]
    if precision == "bf16":
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_cpu_bf16.py"),
                            *map(str, args), "--bf16"], capture_output=True, text=True, env=env, timeout=600)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-3000:]
    else:
        extra = {"fp16": ["--fp16", "--fp16-no-flatten-grads"], "amp": ["--amp"], "fp32": []}[precision]
        out = run("fairseq-train", *args, *extra)
    losses = [float(json.loads(m)["loss"]) for m in re.findall(r"train_inner\s*[|:]\s*(\{.*\})", out)]
    assert len(losses) == updates, out[-3000:]
    assert all(math.isfinite(v) for v in losses), losses
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16", "amp"])
@pytest.mark.parametrize("kernel", ["softmax", "linear", "performer", "dpfp"])
@pytest.mark.parametrize("update", ["sum", "delta"])
def test_every_kernel_and_rule_trains_in_each_precision(tiny_lm_corpus, kernel, update, precision):
    if kernel == "softmax" and update == "delta":
        pytest.skip("softmax ignores --fwp-update")
    _train(tiny_lm_corpus, kernel, update, precision)


@pytest.mark.slow
def test_bf16_2000_updates_within_5_percent_of_fp32(tmp_path):
    """The issue's check: scripts/bf16_check.py, 2,000 updates per kernel, bf16 vs fp32."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bf16_check.py"), "--updates", "2000",
                        "--jobs", "2", "--workdir", str(tmp_path)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
