"""fwp_transformer: fairseq's encoder-decoder Transformer with fast-weight attention
(the paper's WMT14 En-De models; arXiv 2102.11174, section 6.2).

By default all three attention types use fast weights, as in the paper; each can keep fairseq's
softmax attention (--fwp-softmax-encoder-self-attn etc.), and --fwp-kernel softmax is the plain
fairseq Transformer with the same flags and checkpoint layout. Hybrids keep whole layers softmax:
--fwp-softmax-layers (decoder: self- and encoder-decoder attention), --fwp-softmax-encoder-layers."""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerModel,
    base_architecture,
    transformer_vaswani_wmt_en_de_big,
)

from ..modules.fast_weight_attention import FastWeightAttention
from .fwp_options import (FwpTransformerFields, add_fwp_args, fwp_options, install_fast_weights,
                          set_defaults, set_fwp_defaults)
from .presets import GATED_DELTANET


@register_model("fwp_transformer")
class FwpTransformerModel(TransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_fwp_args(parser, FwpTransformerFields)

    @classmethod
    def build_model(cls, args, task):
        fwp_transformer_base(args)  # checkpoints from older versions may lack a flag
        opts = fwp_options(args)  # read (and validated) before fairseq's config drops anything
        model = super().build_model(args, task)
        install_fast_weights(opts, model.encoder, model.decoder)
        return model

    def set_beam_size(self, beam_size):
        """fairseq's SequenceGenerator calls this with its beam size (> 1), on models that have it
        (fairseq's own TransformerModel has not): the fast-weight encoder-decoder attention then
        keeps one memory per sentence instead of one per beam (modules/beam_memory.py)."""
        for module in self.decoder.modules():
            if isinstance(module, FastWeightAttention) and module.encoder_decoder_attention:
                module.set_beam_size(beam_size)


@register_model_architecture("fwp_transformer", "fwp_transformer")
def fwp_transformer_base(args):
    # The paper's MT runs only vary phi: the sum rule (the fields' default) everywhere.
    set_fwp_defaults(args, FwpTransformerFields)
    base_architecture(args)


@register_model_architecture("fwp_transformer", "fwp_transformer_wmt_en_de_big")
def fwp_transformer_wmt_en_de_big(args):
    """Transformer big: 6+6 layers, d_model 1024, 16 heads (d_key 64), FFN 4096, dropout 0.3."""
    set_fwp_defaults(args, FwpTransformerFields)
    transformer_vaswani_wmt_en_de_big(args)


@register_model_architecture("fwp_transformer", "fwp_transformer_tiny")
def fwp_transformer_tiny(args):
    """For tests and smoke runs: 2+2 layers, d_model 32, 4 heads, FFN 64."""
    set_defaults(args, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_layers=2,
                 encoder_attention_heads=4, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                 decoder_layers=2, decoder_attention_heads=4)
    fwp_transformer_base(args)


@register_model_architecture("fwp_transformer", "fwp_transformer_gated_deltanet")
def fwp_transformer_gated_deltanet(args):
    """fairseq's base Transformer with the Gated DeltaNet layer (presets.py) as decoder
    self-attention; the encoder's and the encoder-decoder attention are fast weights with the
    same q, k (identity, L2), the sum rule and the same output norm."""
    set_defaults(args, **GATED_DELTANET)
    fwp_transformer_base(args)
