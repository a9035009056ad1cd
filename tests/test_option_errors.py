"""--fwp-* options that do not go together fail at start-up with one line naming the flag;
FAVOR+ with the delta rule is allowed but warns. Mostly through fwp_options() itself (what
build_model calls first), two cases through fairseq-train."""
import argparse
import logging
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fairseq")
from fwp_fairseq.models.fwp_options import fwp_options  # noqa: E402


def opts(**kw):
    return argparse.Namespace(**{f"fwp_{k}": v for k, v in kw.items()})


@pytest.mark.parametrize("kw, flag", [
    (dict(kernel="gaussian"), "--fwp-kernel"),
    (dict(update="hebbian"), "--fwp-update"),
    (dict(impl="triton"), "--fwp-impl"),
    (dict(kernel="dpfp", dpfp_nu=0), "--fwp-dpfp-nu"),
    (dict(kernel="dpfp", dpfp_nu=-2), "--fwp-dpfp-nu"),
    (dict(kernel="performer", performer_features=0), "--fwp-performer-features"),
    (dict(kernel="performer", no_sum_normalize=True), "--fwp-no-sum-normalize"),
    (dict(sum_normalize=True, no_sum_normalize=True), "--fwp-sum-normalize"),
    (dict(sum_normalize=True, l2_normalize=True), "--fwp-sum-normalize"),
    (dict(kernel="identity", sum_normalize=True), "--fwp-sum-normalize"),
    (dict(kernel="identity", attn_normalize=True), "--fwp-attn-normalize"),
    (dict(attn_normalize=True, no_attn_normalize=True), "--fwp-attn-normalize"),
    (dict(gate="vector"), "--fwp-gate"),
    (dict(beta_range="triple"), "--fwp-beta-range"),
    (dict(kernel="softmax", gate="scalar"), "--fwp-gate"),
    (dict(kernel="softmax", update="delta", beta_range="double"), "--fwp-beta-range"),
    (dict(update="sum", beta_range="double"), "--fwp-beta-range"),
    (dict(softmax_layers="0,x"), "--fwp-softmax-layers"),
    (dict(softmax_layers="-1"), "--fwp-softmax-layers"),
    (dict(softmax_encoder_layers="1;2"), "--fwp-softmax-encoder-layers"),
    (dict(kernel="silu", sum_normalize=True), "--fwp-sum-normalize"),
    (dict(kernel="silu", attn_normalize=True), "--fwp-attn-normalize"),
    (dict(short_conv=-1), "--fwp-short-conv"),
    (dict(kernel="softmax", short_conv=4), "--fwp-short-conv"),
    (dict(kernel="softmax", output_norm="rms"), "--fwp-output-norm"),
    (dict(output_norm="layer"), "--fwp-output-norm"),
    (dict(output_norm="rms-gated", attn_normalize=True), "--fwp-attn-normalize and --fwp-output-norm"),
    (dict(short_conv_encoder=True), "--fwp-short-conv-encoder: needs --fwp-short-conv"),
])
def test_bad_combination_is_one_line_naming_the_flag(kw, flag):
    with pytest.raises(ValueError) as e:
        fwp_options(opts(**kw))
    msg = str(e.value)
    assert msg.startswith(flag) and "\n" not in msg, msg


def test_cuda_impl_needs_a_gpu():
    """--fwp-impl cuda with --cpu (or without a GPU) fails before any data is loaded."""
    cases = [dict(impl="cuda", cpu=True)]
    if not torch.cuda.is_available():
        cases.append(dict(impl="cuda"))
    for kw in cases:
        ns = opts(impl=kw["impl"])
        ns.cpu = kw.get("cpu", False)
        with pytest.raises(ValueError, match=r"^--fwp-impl: 'cuda' needs a CUDA GPU"):
            fwp_options(ns)


def test_performer_with_delta_warns_but_builds(caplog):
    with caplog.at_level(logging.WARNING):
        o = fwp_options(opts(kernel="performer", update="delta"))
    assert o.feature_map == "performer" and o.update == "delta"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--fwp-kernel performer" in m and "--fwp-update delta" in m and "NaN" in m for m in warned)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fwp_options(opts(kernel="performer", update="sum"))
        fwp_options(opts(kernel="dpfp", update="delta"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def _train_fails(tmp_path, *flags):
    """fairseq-train on an empty dictionary (no data needed to fail at build time)."""
    import fwp_fairseq
    (tmp_path / "dict.txt").write_text("a 1\nb 1\n")
    cmd = [os.path.join(os.path.dirname(sys.executable), "fairseq-train"), str(tmp_path),
           "--user-dir", os.path.dirname(fwp_fairseq.__file__), "--cpu", "--task", "language_modeling",
           "--arch", "fwp_lm_tiny", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "64",
           "--save-dir", str(tmp_path / "ckpt"), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0
    return p.stderr.strip().splitlines()[-1]


def test_cli_reports_the_flag(tmp_path):
    """Our check (build time: the last line of the error) and argparse's (unknown kernel)."""
    last = _train_fails(tmp_path, "--fwp-kernel", "dpfp", "--fwp-dpfp-nu", "0")
    assert last == "ValueError: --fwp-dpfp-nu: DPFP order must be >= 1, got 0", last


@pytest.mark.slow
def test_cli_rejects_unknown_kernel_and_cuda_on_cpu(tmp_path):
    last = _train_fails(tmp_path, "--fwp-kernel", "gaussian")
    assert "argument --fwp-kernel: invalid choice" in last, last
    last = _train_fails(tmp_path, "--fwp-impl", "cuda")
    assert last.startswith("ValueError: --fwp-impl: 'cuda' needs a CUDA GPU"), last


def test_l2_normalize_replaces_sum_normalisation():
    o = fwp_options(opts(update="delta", l2_normalize=True))
    assert o.l2_norm and o.sum_norm is None  # the layer turns sum normalisation off
    # performer needs its features normalised: L2 instead of sum is fine
    o = fwp_options(opts(kernel="performer", no_sum_normalize=True, l2_normalize=True))
    assert o.l2_norm and o.sum_norm is False


def test_flags_and_layer_share_one_definition():
    """The flags default to the layer's own argument defaults, and a contradiction is the same
    check through both (resolve_normalisation), naming the flag or the argument."""
    import inspect
    from fwp_fairseq.models.fwp_options import FwpFields
    from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention
    layer_defaults = inspect.signature(FastWeightAttention).parameters
    for flag, arg in (("fwp_kernel", "feature_map"), ("fwp_update", "update"), ("fwp_dpfp_nu", "dpfp_nu"),
                      ("fwp_performer_features", "performer_features"), ("fwp_performer_seed", "seed"),
                      ("fwp_impl", "impl"), ("fwp_gate", "gate"), ("fwp_beta_range", "beta_range"),
                      ("fwp_short_conv", "short_conv"), ("fwp_output_norm", "output_norm")):
        assert FwpFields.__dataclass_fields__[flag].default == layer_defaults[arg].default, flag
    for flags, kwargs in ((dict(kernel="identity", sum_normalize=True), dict(feature_map="identity", sum_norm=True)),
                          (dict(kernel="performer", no_sum_normalize=True), dict(feature_map="performer", sum_norm=False))):
        with pytest.raises(ValueError) as by_flag:
            fwp_options(opts(**flags))
        with pytest.raises(ValueError) as by_arg:
            FastWeightAttention(8, 2, self_attention=True, causal=True, **kwargs)
        flag_msg = str(by_flag.value).replace("--fwp-no-sum-normalize", "sum_norm")
        flag_msg = flag_msg.replace("--fwp-sum-normalize", "sum_norm").replace("--fwp-l2-normalize", "l2_norm")
        assert flag_msg == str(by_arg.value)


def test_double_beta_without_unit_keys_warns(caplog):
    """beta in (0, 2) reflects only unit keys: without --fwp-l2-normalize it builds but warns."""
    with caplog.at_level(logging.WARNING):
        o = fwp_options(opts(update="delta", beta_range="double"))
    assert o.beta_range == "double"
    assert any("--fwp-beta-range double" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fwp_options(opts(kernel="identity", update="delta", beta_range="double", l2_normalize=True))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
