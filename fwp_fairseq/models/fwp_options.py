"""The --fwp-* options shared by fwp_transformer and fwp_lm, and how they turn into layers.

One dataclass declares the flags (fairseq builds argparse flags and the LM's config from it);
``fwp_options(args)`` reads them straight from the model's args/config, never through fairseq's
TransformerConfig, which drops fields it does not know for dataclass-configured models."""
import logging
from dataclasses import dataclass, field, fields

import torch

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

KERNELS = ("softmax", "linear", "performer", "dpfp", "identity")
UPDATES = ("sum", "delta")
IMPLS = ("auto", "reference", "chunked", "cuda")

logger = logging.getLogger(__name__)


@dataclass
class FwpFields(FairseqDataclass):
    fwp_kernel: ChoiceEnum(KERNELS) = field(
        default="linear",
        metadata={"help": "feature map phi of the fast-weight attention; 'softmax' keeps "
                          "fairseq's own MultiheadAttention (the baseline); 'identity' (phi(x) = x, "
                          "signed: no sum normalisation or attention normaliser; use it with "
                          "--fwp-l2-normalize) is not in the paper"})
    fwp_update: ChoiceEnum(UPDATES) = field(
        default="sum",
        metadata={"help": "update rule of causal (decoder) self-attention; non-causal attention "
                          "(encoder self-attention, encoder-decoder attention) always writes all "
                          "keys with the sum rule, then reads"})
    fwp_dpfp_nu: int = field(default=1, metadata={"help": "DPFP order nu (d_dot = 2 * head_dim * nu)"})
    fwp_performer_features: int = field(
        default=16, metadata={"help": "FAVOR+ random features m (d_dot = 2m); redrawn every "
                                      "training update from --seed and the update number"})
    fwp_performer_seed: int = field(
        default=1, metadata={"help": "seed of the FAVOR+ draws (each layer offsets it)"})
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
        default="auto", metadata={"help": "implementation of the causal recurrence (fwp_fairseq.ops)"})


@dataclass
class FwpTransformerFields(FwpFields):
    """fwp_transformer: each attention type can keep fairseq's softmax attention on its own."""
    fwp_softmax_encoder_self_attn: bool = field(
        default=False, metadata={"help": "keep softmax attention in encoder self-attention"})
    fwp_softmax_decoder_self_attn: bool = field(
        default=False, metadata={"help": "keep softmax attention in decoder self-attention"})
    fwp_softmax_encoder_decoder_attn: bool = field(
        default=False, metadata={"help": "keep softmax attention in encoder-decoder attention"})


@dataclass
class FwpOptions:
    """The resolved options that every FastWeightAttention of a model is built from."""
    kernel: str = "linear"
    update: str = "sum"
    dpfp_nu: int = 1
    performer_features: int = 16
    attn_normalize: object = None  # None: per attention (on for the sum rule, off for delta)
    sum_normalize: object = None  # None: per attention (on for delta or performer)
    l2_normalize: bool = False
    impl: str = "auto"
    seed: int = 1
    encoder_self_attn: bool = True
    decoder_self_attn: bool = True
    encoder_decoder_attn: bool = True

    @property
    def fast(self):
        return self.kernel != "softmax"


def add_fwp_args(parser, fields_cls=FwpTransformerFields):
    """Declare the flags on an argparse parser without defaults (architectures set them)."""
    gen_parser_from_dataclass(parser, fields_cls(), delete_default=True)


def set_fwp_defaults(args, fields_cls, **overrides):
    """Fill every --fwp-* field the command line left unset (for architecture functions)."""
    for f in fields(fields_cls):
        if f.name.startswith("fwp_") and getattr(args, f.name, None) is None:
            setattr(args, f.name, overrides.get(f.name, f.default))


def _tri_state(args, on, off, what):
    on_v, off_v = bool(getattr(args, on, False)), bool(getattr(args, off, False))
    if on_v and off_v:
        raise ValueError(f"--{on.replace('_', '-')} and --{off.replace('_', '-')} contradict each other ({what})")
    return True if on_v else (False if off_v else None)


def fwp_options(args):
    """Validate the --fwp-* flags of a model's args (Namespace or DictConfig) -> FwpOptions.
    Errors name the flag."""
    def get(name, default):
        v = getattr(args, name, None)
        return default if v is None else v

    kernel = str(get("fwp_kernel", "linear"))
    update = str(get("fwp_update", "sum"))
    impl = str(get("fwp_impl", "auto"))
    nu = int(get("fwp_dpfp_nu", 1))
    m = int(get("fwp_performer_features", 16))
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
    sum_norm = _tri_state(args, "fwp_sum_normalize", "fwp_no_sum_normalize", "sum normalisation")
    l2_norm = bool(get("fwp_l2_normalize", False))
    if l2_norm and sum_norm:
        raise ValueError("--fwp-sum-normalize and --fwp-l2-normalize contradict each other (phi is "
                         "normalised one way)")
    if kernel == "identity":
        if sum_norm:
            raise ValueError("--fwp-sum-normalize: identity features are signed and can sum to zero "
                             "(use --fwp-l2-normalize)")
        if bool(getattr(args, "fwp_attn_normalize", False)):
            raise ValueError("--fwp-attn-normalize: identity features are signed, the normaliser "
                             "z . phi(q) can be zero")
    if kernel == "performer" and sum_norm is False and not l2_norm:
        raise ValueError("--fwp-no-sum-normalize: performer features are only defined up to a "
                         "per-vector factor and must be normalised (sum, or --fwp-l2-normalize)")
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
        kernel=kernel, update=update, dpfp_nu=nu, performer_features=m,
        attn_normalize=_tri_state(args, "fwp_attn_normalize", "fwp_no_attn_normalize", "attention normaliser"),
        sum_normalize=sum_norm, l2_normalize=l2_norm, impl=impl, seed=int(get("fwp_performer_seed", 1)),
        encoder_self_attn=not bool(get("fwp_softmax_encoder_self_attn", False)),
        decoder_self_attn=not bool(get("fwp_softmax_decoder_self_attn", False)),
        encoder_decoder_attn=not bool(get("fwp_softmax_encoder_decoder_attn", False)),
    )


def build_attention(opts, embed_dim, num_heads, seed_offset, kdim=None, causal=False, cross=False):
    """One FastWeightAttention for a given use, from the resolved options."""
    from ..modules.fast_weight_attention import FastWeightAttention
    return FastWeightAttention(
        embed_dim, num_heads, kdim=kdim, vdim=kdim, self_attention=not cross,
        encoder_decoder_attention=cross, causal=causal, kernel=opts.kernel, update=opts.update,
        dpfp_nu=opts.dpfp_nu, performer_features=opts.performer_features,
        attn_normalize=opts.attn_normalize, sum_normalize=opts.sum_normalize,
        l2_normalize=opts.l2_normalize, seed=opts.seed * 10_007 + seed_offset, impl=opts.impl)


def install_fast_weights(opts, encoder=None, decoder=None):
    """Replace the MultiheadAttention modules of fairseq's built transformer layers by
    FastWeightAttention where the options ask for it. Swapping after fairseq built the layers
    keeps every other part of fairseq's model (and its checkpoints' other keys) unchanged."""
    if not opts.fast:
        return
    if encoder is not None and opts.encoder_self_attn:
        for i, layer in enumerate(encoder.layers):
            a = layer.self_attn
            layer.self_attn = build_attention(opts, a.embed_dim, a.num_heads, 3 * i)
    if decoder is None:
        return
    offset = 3 * len(encoder.layers) if encoder is not None else 0
    for i, layer in enumerate(decoder.layers):
        if opts.decoder_self_attn:
            a = layer.self_attn
            if getattr(layer, "cross_self_attention", False):
                raise ValueError("--cross-self-attention: not supported with fast-weight decoder self-attention")
            layer.self_attn = build_attention(opts, a.embed_dim, a.num_heads, offset + 3 * i + 1, causal=True)
        if opts.encoder_decoder_attn and getattr(layer, "encoder_attn", None) is not None:
            a = layer.encoder_attn
            layer.encoder_attn = build_attention(opts, a.embed_dim, a.num_heads, offset + 3 * i + 2,
                                                 kdim=a.kdim, cross=True)
