"""fwp_lm: fairseq's decoder-only Transformer language model with fast-weight causal
self-attention (the paper's WikiText-103 models; ../shared/PAPER.md section 4).

--fwp-kernel softmax is fairseq's transformer_lm with the same flags and checkpoint layout."""
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)

from .fwp_options import UPDATES, FwpFields, fwp_options, install_fast_weights, set_fwp_defaults


@dataclass
class FwpLMConfig(TransformerLanguageModelConfig, FwpFields):
    # The paper's proposal (Delta Net) is the LM default.
    fwp_update: ChoiceEnum(UPDATES) = field(
        default="delta", metadata={"help": "update rule of the causal self-attention"})


@register_model("fwp_lm", dataclass=FwpLMConfig)
class FwpLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        # Read the flags from the model config itself: fairseq's TransformerConfig.from_namespace
        # drops unknown fields of a dataclass config, so the layers would never see them.
        opts = fwp_options(args)
        model = super().build_model(args, task)
        install_fast_weights(opts, decoder=model.decoder)
        return model


def fwp_lm_base(args):
    """Defaults for named architectures (--arch fwp_lm itself takes FwpLMConfig's defaults)."""
    set_fwp_defaults(args, FwpLMConfig, fwp_update="delta")
    base_lm_architecture(args)


def _set(args, **values):
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _wiki103(args, dim):
    """Paper Table 2: 16 layers, 8 heads, FFN 2048, dropout 0.1, adaptive input and softmax with
    div 1 (factor 1) and tied weights. Context (--tokens-per-sample 256 / 384) is a task flag."""
    cutoff = "20000,40000,200000"
    _set(args, decoder_layers=16, decoder_embed_dim=dim, decoder_input_dim=dim, decoder_output_dim=dim,
         decoder_attention_heads=8, decoder_ffn_embed_dim=2048, dropout=0.1, attention_dropout=0.0,
         adaptive_input=True, adaptive_input_factor=1, adaptive_input_cutoff=cutoff,
         adaptive_softmax_cutoff=cutoff, adaptive_softmax_factor=1, adaptive_softmax_dropout=0.0,
         tie_adaptive_weights=True, tie_adaptive_proj=True)
    fwp_lm_base(args)


@register_model_architecture("fwp_lm", "fwp_lm_wiki103_small")
def fwp_lm_wiki103_small(args):
    """d_model 128: about 40M parameters with WikiText-103's 267,735-word vocabulary."""
    _wiki103(args, 128)


@register_model_architecture("fwp_lm", "fwp_lm_wiki103_medium")
def fwp_lm_wiki103_medium(args):
    """d_model 256: about 90M parameters with WikiText-103's vocabulary."""
    _wiki103(args, 256)


@register_model_architecture("fwp_lm", "fwp_lm_tiny")
def fwp_lm_tiny(args):
    """For tests and smoke runs: 2 layers, d_model 32, 4 heads, FFN 64."""
    _set(args, decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=64)
    fwp_lm_base(args)
