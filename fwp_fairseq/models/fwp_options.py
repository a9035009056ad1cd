"""The --fwp-* options shared by fwp_transformer and fwp_lm, and how they turn into layers.

One dataclass declares the flags (fairseq builds argparse flags and the LM's config from it),
with the attention layer's own defaults; ``fwp_options(args)`` reads them straight from the
model's args/config, never through fairseq's TransformerConfig, which drops fields it does not
know for dataclass-configured models."""
import inspect
import logging
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from ..modules.fast_weight_attention import FastWeightAttention
from ..modules.feature_maps import FEATURE_MAPS, resolve_normalisation
from ..modules.gate import BETA_RANGES, GATES
from ..modules.output_norm import OUTPUT_NORMS, check_output_norm
from ..ops import IMPLS, UPDATES

# --fwp-kernel: "softmax" keeps fairseq's MultiheadAttention; the other choices are feature maps.
KERNELS = ("softmax",) + tuple(FEATURE_MAPS)
# resolve_normalisation's errors name these flags.
FLAGS = {"attn_normalize": "--fwp-attn-normalize", "sum_norm": "--fwp-sum-normalize",
         "no_sum_norm": "--fwp-no-sum-normalize", "l2_norm": "--fwp-l2-normalize"}

logger = logging.getLogger(__name__)


def _layer_default(argument):
    """A flag's default is the default of the FastWeightAttention argument it sets."""
    return inspect.signature(FastWeightAttention).parameters[argument].default


@dataclass
class FwpFields(FairseqDataclass):
    fwp_kernel: ChoiceEnum(KERNELS) = field(
        default=_layer_default("feature_map"),
        metadata={"help": "feature map phi of the fast-weight attention; 'softmax' keeps "
                          "fairseq's own MultiheadAttention (the baseline); 'identity' (phi(x) = x, "
                          "signed: no sum normalisation or attention normaliser; use it with "
                          "--fwp-l2-normalize) is not in the paper"})
    fwp_update: ChoiceEnum(UPDATES) = field(
        default=_layer_default("update"),
        metadata={"help": "update rule of causal (decoder) self-attention; non-causal attention "
                          "(encoder self-attention, encoder-decoder attention) always writes all "
                          "keys with the sum rule, then reads"})
    fwp_dpfp_nu: int = field(
        default=_layer_default("dpfp_nu"), metadata={"help": "DPFP order nu (d_dot = 2 * head_dim * nu)"})
    fwp_performer_features: int = field(
        default=_layer_default("performer_features"),
        metadata={"help": "FAVOR+ random features m (d_dot = 2m); redrawn every training update "
                          "from --seed and the update number"})
    fwp_performer_seed: int = field(
        default=_layer_default("seed"), metadata={"help": "seed of the FAVOR+ draws (each layer offsets it)"})
    fwp_attn_normalize: bool = field(
        default=False, metadata={"help": "force the attention normaliser z on everywhere (default: "
                                         "on for sum-rule attention, off for delta-rule attention)"})
    fwp_no_attn_normalize: bool = field(
        default=False, metadata={"help": "force the attention normaliser z off everywhere"})
    fwp_sum_normalize: bool = field(
        default=False, metadata={"help": "force sum normalisation of phi on (default: on with the "
                                         "delta rule, DPFP and performer, off otherwise)"})
    fwp_no_sum_normalize: bool = field(
        default=False, metadata={"help": "force sum normalisation of phi off (not allowed with "
                                         "performer, whose features are defined up to a factor)"})
    fwp_l2_normalize: bool = field(
        default=False, metadata={"help": "L2-normalise phi(k) and phi(q) instead of sum-normalising "
                                         "them (not in the paper): a delta-rule write with beta = 1 "
                                         "then replaces what the memory held along its key"})
    fwp_impl: ChoiceEnum(IMPLS) = field(
        default=_layer_default("impl"),
        metadata={"help": "implementation of the causal recurrence (fwp_fairseq.ops)"})
    fwp_gate: ChoiceEnum(GATES) = field(
        default=_layer_default("gate"),
        metadata={"help": "forget gate of causal fast-weight self-attention (not in the paper): "
                          "'scalar' decays the state (and the normaliser z) by a_t = exp(g_t) per "
                          "head and step, g_t = -exp(A) softplus(w . x_t + b) as in Mamba-2 and "
                          "Gated DeltaNet (Yang et al., ICLR 2025), a_t near 1 at the start"})
    fwp_beta_range: ChoiceEnum(BETA_RANGES) = field(
        default=_layer_default("beta_range"),
        metadata={"help": "range of the delta rule's beta: 'unit' (0, 1) as in the paper, "
                          "'double' (0, 2) (Grazzi et al., ICLR 2025: negative eigenvalues for "
                          "state tracking); a reflection needs unit keys: use it with "
                          "--fwp-l2-normalize (e.g. --fwp-kernel identity)"})
    fwp_householder: int = field(
        default=_layer_default("householder"),
        metadata={"help": "DeltaProduct (Siems et al. 2025; not in the paper): N delta-rule writes per "
                          "token in causal self-attention, each with its own key, value and beta "
                          "projection; the state transition is a product of N generalised Householder "
                          "matrices (with --fwp-beta-range double and unit keys: permutations). "
                          "Needs --fwp-update delta; 1 (default) is the delta rule"})
    fwp_softmax_layers: str = field(
        default="", metadata={"help": "hybrid model: comma-separated decoder layer indices (from 0) "
                                      "that keep fairseq's softmax attention (self-attention and, in "
                                      "fwp_transformer, encoder-decoder attention); fast weights "
                                      "elsewhere"})
    fwp_short_conv: int = field(
        default=_layer_default("short_conv"),
        metadata={"help": "kernel size K of a causal depthwise convolution over time, then SiLU, on "
                          "each of the q, k, v projections of causal fast-weight self-attention (as "
                          "in DeltaNet and Gated DeltaNet, Yang et al. 2024, 2025; 4 is usual), and with "
                          "--fwp-householder N on the keys and values of all N writes; 0: off"})
    fwp_output_norm: ChoiceEnum(OUTPUT_NORMS) = field(
        default=_layer_default("output_norm"),
        metadata={"help": "per-head RMS norm (learned scale) of every fast-weight read-out before the "
                          "output projection; 'rms-gated' also multiplies it by SiLU(W_g x), a new "
                          "projection of the layer input (Gated DeltaNet). It divides out the "
                          "attention normaliser, which it turns off (with --fwp-attn-normalize: error)"})


@dataclass
class FwpTransformerFields(FwpFields):
    """fwp_transformer: each attention type can keep fairseq's softmax attention on its own."""
    fwp_softmax_encoder_self_attn: bool = field(
        default=False, metadata={"help": "keep softmax attention in encoder self-attention"})
    fwp_softmax_decoder_self_attn: bool = field(
        default=False, metadata={"help": "keep softmax attention in decoder self-attention"})
    fwp_softmax_encoder_decoder_attn: bool = field(
        default=False, metadata={"help": "keep softmax attention in encoder-decoder attention"})
    fwp_softmax_encoder_layers: str = field(
        default="", metadata={"help": "hybrid model: comma-separated encoder layer indices (from 0) "
                                      "that keep fairseq's softmax self-attention"})
    fwp_short_conv_encoder: bool = field(
        default=False, metadata={"help": "also give encoder self-attention the --fwp-short-conv "
                                         "convolution, centred (non-causal; padding counts as zero)"})


@dataclass
class FwpOptions:
    """The checked options every FastWeightAttention of a model is built from (fwp_options)."""
    feature_map: Optional[str]  # None: fairseq's softmax attention
    update: str
    dpfp_nu: int
    performer_features: int
    attn_normalize: Optional[bool]  # None: the layer's default (resolve_normalisation)
    sum_norm: Optional[bool]  # None: likewise
    l2_norm: bool
    impl: str
    seed: int
    encoder_self_attn: bool
    decoder_self_attn: bool
    encoder_decoder_attn: bool
    gate: str
    beta_range: str
    householder: int
    softmax_layers: tuple  # decoder layers that keep fairseq's attention
    softmax_encoder_layers: tuple
    short_conv: int = 0
    output_norm: str = "none"
    short_conv_encoder: bool = False

    @property
    def fast(self):
        return self.feature_map is not None


def add_fwp_args(parser, fields_cls=FwpTransformerFields):
    """Declare the flags on an argparse parser without defaults (architectures set them)."""
    gen_parser_from_dataclass(parser, fields_cls(), delete_default=True)


def set_defaults(args, **values):
    """Fill the attributes of args that are missing or None (for architecture functions)."""
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def set_fwp_defaults(args, fields_cls):
    """Fill every --fwp-* field the command line left unset with fields_cls's default."""
    set_defaults(args, **{f.name: f.default for f in fields(fields_cls) if f.name.startswith("fwp_")})


def _tri_state(args, on, off, what):
    on_v, off_v = bool(getattr(args, on, False)), bool(getattr(args, off, False))
    if on_v and off_v:
        raise ValueError(f"--{on.replace('_', '-')} and --{off.replace('_', '-')} contradict each other ({what})")
    return True if on_v else (False if off_v else None)


_FIELD_DEFAULTS = {f.name: f.default for f in fields(FwpTransformerFields)}


def _layer_list(value, flag):
    """"0,8" -> (0, 8); "" -> (). The range is checked against the model (install_fast_weights)."""
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    if not all(s.isdigit() for s in items):
        raise ValueError(f"{flag}: expected comma-separated layer indices >= 0, got {value!r}")
    return tuple(sorted({int(s) for s in items}))


def _check_gate_and_beta(kernel, update, gate, beta_range, l2_norm):
    """--fwp-gate / --fwp-beta-range act on the fast-weight recurrence of causal layers."""
    if kernel == "softmax" and (gate != "none" or beta_range != "unit"):
        flag = "--fwp-gate" if gate != "none" else "--fwp-beta-range"
        raise ValueError(f"{flag}: --fwp-kernel softmax has no fast weights to gate or write")
    if beta_range != "unit" and update != "delta":
        raise ValueError(f"--fwp-beta-range: {beta_range!r} needs --fwp-update delta (the sum rule has no beta)")
    if beta_range == "double" and not l2_norm:
        logger.warning("--fwp-beta-range double without --fwp-l2-normalize: |phi(k)| < 1, so "
                       "1 - beta |phi(k)|^2 cannot reach -1 (no reflection)")


def _check_householder(kernel, update, householder, attn_norm):
    """--fwp-householder N > 1 writes N times with the causal delta rule, without the normaliser z."""
    if householder < 1:
        raise ValueError(f"--fwp-householder: expected N >= 1 (writes per token), got {householder}")
    if householder == 1:
        return
    if kernel == "softmax":
        raise ValueError("--fwp-householder: --fwp-kernel softmax has no fast weights to write")
    if update != "delta":
        raise ValueError(f"--fwp-householder: {householder} writes per token need --fwp-update delta "
                         f"(got --fwp-update {update})")
    if attn_norm:
        raise ValueError("--fwp-householder: DeltaProduct has no attention normaliser; "
                         "drop --fwp-attn-normalize")


def _check_conv_and_norm(kernel, short_conv, output_norm):
    """--fwp-short-conv / --fwp-output-norm act on fast-weight attention."""
    if short_conv < 0:
        raise ValueError(f"--fwp-short-conv: kernel size must be >= 0 (0: off), got {short_conv}")
    if kernel == "softmax" and (short_conv or output_norm != "none"):
        flag = "--fwp-short-conv" if short_conv else "--fwp-output-norm"
        raise ValueError(f"{flag}: --fwp-kernel softmax keeps fairseq's attention, which has none")


def fwp_options(args):
    """Validate the --fwp-* flags of a model's args (Namespace or DictConfig) -> FwpOptions.
    Errors name the flag; a flag missing from args takes its dataclass default."""
    def get(name):
        v = getattr(args, name, None)
        return _FIELD_DEFAULTS[name] if v is None else v

    kernel, update, impl = str(get("fwp_kernel")), str(get("fwp_update")), str(get("fwp_impl"))
    nu, m = int(get("fwp_dpfp_nu")), int(get("fwp_performer_features"))
    if kernel not in KERNELS:
        raise ValueError(f"--fwp-kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if update not in UPDATES:
        raise ValueError(f"--fwp-update: expected one of {', '.join(UPDATES)}, got {update!r}")
    if impl not in IMPLS:
        raise ValueError(f"--fwp-impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if nu < 1:
        raise ValueError(f"--fwp-dpfp-nu: DPFP order must be >= 1, got {nu}")
    if m < 1:
        raise ValueError(f"--fwp-performer-features: FAVOR+ needs m >= 1, got {m}")
    attn_norm = _tri_state(args, "fwp_attn_normalize", "fwp_no_attn_normalize", "attention normaliser")
    sum_norm = _tri_state(args, "fwp_sum_normalize", "fwp_no_sum_normalize", "sum normalisation")
    l2_norm = bool(get("fwp_l2_normalize"))
    gate, beta_range = str(get("fwp_gate")), str(get("fwp_beta_range"))
    if gate not in GATES:
        raise ValueError(f"--fwp-gate: expected one of {', '.join(GATES)}, got {gate!r}")
    if beta_range not in BETA_RANGES:
        raise ValueError(f"--fwp-beta-range: expected one of {', '.join(BETA_RANGES)}, got {beta_range!r}")
    _check_gate_and_beta(kernel, update, gate, beta_range, l2_norm)
    householder = int(get("fwp_householder"))
    _check_householder(kernel, update, householder, attn_norm)
    short_conv, output_norm = int(get("fwp_short_conv")), str(get("fwp_output_norm"))
    _check_conv_and_norm(kernel, short_conv, output_norm)
    short_conv_encoder = bool(get("fwp_short_conv_encoder"))
    if short_conv_encoder and not short_conv:
        raise ValueError("--fwp-short-conv-encoder: needs --fwp-short-conv K (the kernel size)")
    attn_norm = check_output_norm(output_norm, attn_norm, names={
        "output_norm": "--fwp-output-norm", "attn_normalize": "--fwp-attn-normalize"})
    # The layers resolve the defaults; contradictions fail here, at start-up, naming the flag.
    resolve_normalisation(kernel, update, attn_norm, sum_norm, l2_norm, names=FLAGS)
    if impl == "cuda" and (bool(getattr(args, "cpu", False)) or not torch.cuda.is_available()):
        # Fail before any data is loaded rather than at the first forward.
        raise ValueError("--fwp-impl: 'cuda' needs a CUDA GPU (none here, or --cpu); use auto, "
                         "chunked or reference (for a checkpoint: --model-overrides "
                         "\"{'fwp_impl': 'auto'}\")")
    if kernel == "performer" and update == "delta":
        # Allowed (the paper's LM ran it), but the synthetic task saw NaN: say so once, at build.
        logger.warning("--fwp-kernel performer with --fwp-update delta: the paper saw NaN with "
                       "this pair in its synthetic task; watch the loss")
    return FwpOptions(
        feature_map=None if kernel == "softmax" else kernel, update=update, dpfp_nu=nu,
        performer_features=m, attn_normalize=attn_norm, sum_norm=sum_norm, l2_norm=l2_norm,
        impl=impl, seed=int(get("fwp_performer_seed")),
        encoder_self_attn=not bool(get("fwp_softmax_encoder_self_attn")),
        decoder_self_attn=not bool(get("fwp_softmax_decoder_self_attn")),
        encoder_decoder_attn=not bool(get("fwp_softmax_encoder_decoder_attn")),
        gate=gate, beta_range=beta_range, householder=householder,
        softmax_layers=_layer_list(get("fwp_softmax_layers"), "--fwp-softmax-layers"),
        softmax_encoder_layers=_layer_list(get("fwp_softmax_encoder_layers"), "--fwp-softmax-encoder-layers"),
        short_conv=short_conv, output_norm=output_norm, short_conv_encoder=short_conv_encoder,
    )


def build_attention(opts, embed_dim, num_heads, seed_offset, kdim=None, causal=False, cross=False):
    """One FastWeightAttention for a given use, from the resolved options."""
    return FastWeightAttention(
        embed_dim, num_heads, kdim=kdim, vdim=kdim, self_attention=not cross,
        encoder_decoder_attention=cross, causal=causal, feature_map=opts.feature_map,
        update=opts.update, dpfp_nu=opts.dpfp_nu, performer_features=opts.performer_features,
        attn_normalize=opts.attn_normalize, sum_norm=opts.sum_norm, l2_norm=opts.l2_norm,
        seed=opts.seed * 10_007 + seed_offset, impl=opts.impl,
        gate=opts.gate if causal else "none", beta_range=opts.beta_range if causal else "unit",
        householder=opts.householder if causal else 1,
        short_conv=opts.short_conv if causal or (opts.short_conv_encoder and not cross) else 0,
        output_norm=opts.output_norm)


def _check_layer_indices(indices, layers, flag):
    n = 0 if layers is None else len(layers)
    bad = [i for i in indices if i >= n]
    if bad:
        raise ValueError(f"{flag}: layer {bad[0]} does not exist (the model has {n} such layers, 0..{n - 1})")


def install_fast_weights(opts, encoder=None, decoder=None):
    """Replace the MultiheadAttention modules of fairseq's built transformer layers by
    FastWeightAttention where the options ask for it. Swapping after fairseq built the layers
    keeps every other part of fairseq's model (and its checkpoints' other keys) unchanged."""
    if not opts.fast:
        return
    _check_layer_indices(opts.softmax_encoder_layers, getattr(encoder, "layers", None),
                         "--fwp-softmax-encoder-layers")
    _check_layer_indices(opts.softmax_layers, getattr(decoder, "layers", None), "--fwp-softmax-layers")
    fast_causal = opts.decoder_self_attn and decoder is not None and len(opts.softmax_layers) < len(decoder.layers)
    if not fast_causal and (opts.gate != "none" or opts.beta_range != "unit" or opts.householder > 1
                            or opts.short_conv):
        flag = ("--fwp-gate" if opts.gate != "none" else
                "--fwp-beta-range" if opts.beta_range != "unit" else
                "--fwp-householder" if opts.householder > 1 else "--fwp-short-conv")
        raise ValueError(f"{flag}: acts on fast-weight decoder self-attention, and no decoder layer has it")
    if encoder is not None and opts.encoder_self_attn:
        for i, layer in enumerate(encoder.layers):
            if i in opts.softmax_encoder_layers:
                continue  # a hybrid model's softmax layer
            a = layer.self_attn
            layer.self_attn = build_attention(opts, a.embed_dim, a.num_heads, 3 * i)
    if decoder is None:
        return
    offset = 3 * len(encoder.layers) if encoder is not None else 0
    for i, layer in enumerate(decoder.layers):
        if i in opts.softmax_layers:
            continue  # a hybrid model's softmax layer: fairseq's self- and encoder-decoder attention
        if opts.decoder_self_attn:
            a = layer.self_attn
            if getattr(layer, "cross_self_attention", False):
                raise ValueError("--cross-self-attention: not supported with fast-weight decoder self-attention")
            layer.self_attn = build_attention(opts, a.embed_dim, a.num_heads, offset + 3 * i + 1, causal=True)
        if opts.encoder_decoder_attn and getattr(layer, "encoder_attn", None) is not None:
            a = layer.encoder_attn
            layer.encoder_attn = build_attention(opts, a.embed_dim, a.num_heads, offset + 3 * i + 2,
                                                 kdim=a.kdim, cross=True)
