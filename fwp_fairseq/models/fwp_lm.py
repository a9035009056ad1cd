"""fwp_lm: fairseq's decoder-only Transformer language model with fast-weight causal
self-attention (the paper's WikiText-103 models; arXiv 2102.11174, section 6.3).

--fwp-kernel softmax is fairseq's transformer_lm with the same flags and checkpoint layout;
--fwp-softmax-layers keeps softmax attention in some layers (a hybrid model)."""
import logging
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)

from ..modules.fast_weight_attention import FastWeightAttention
from ..ops import UPDATES
from .fwp_options import FwpFields, fwp_options, install_fast_weights, set_defaults, set_fwp_defaults
from .presets import GATED_DELTANET

logger = logging.getLogger(__name__)


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

    # -- fast weights carried across segments (task fwp_stream_lm --fwp-carry-state) -------
    # Batches of fwp_stream_lm are segments of contiguous streams and say which segment they
    # are (net_input["stream_segment"]): segment 0 starts the streams again (new epoch, new
    # evaluation), so the state is reset; a gap (resumed mid-epoch) restarts it from zero.
    # With set_carry_reset(N) training instead resets each stream every N segments, the streams
    # of a batch staggered, and carries the state over the start of a new pass.
    carry_state = False
    carry_reset_segments = 0
    eval_reset_segments = 0

    def fast_self_attention(self):
        return [layer.self_attn for layer in self.decoder.layers
                if isinstance(layer.self_attn, FastWeightAttention)]

    def set_carry_state(self, on=True):
        layers = self.fast_self_attention()
        if on:
            if not layers:
                raise ValueError("--fwp-carry-state: the model has no fast-weight self-attention "
                                 "(--fwp-kernel softmax keeps fairseq's attention)")
            if len(layers) < len(self.decoder.layers):
                # A softmax layer's key/value cache has no constant-size state to carry.
                raise ValueError("--fwp-carry-state: not with a hybrid model (--fwp-softmax-layers): "
                                 "softmax layers have no state to carry across segments")
            if self.decoder.embed_positions is not None:
                # Positions would restart at every segment while the state goes on: the result
                # would depend on --tokens-per-sample. The paper's best Delta Net has none.
                raise ValueError("--fwp-carry-state: needs --no-token-positional-embeddings (positions "
                                 "restarting at each segment would contradict the carried state)")
            if len(layers) == len(self.decoder.layers):
                # Fast weights ignore attn_mask: skip fairseq's T x T causal mask, which a long
                # segment (the whole stream in evaluation) could not afford.
                self.decoder.buffered_future_mask = _no_future_mask
        for layer in layers:
            layer.set_carry_state(on)
        self.carry_state = bool(on)
        self._next_segment = {}
        self._train_segments = 0

    def set_carry_reset(self, segments, eval_segments=0):
        """Training streams: reset row r of a B-row batch at the k-th training segment when
        (k + r * N // B) % N == 0 (N = segments), so that every batch holds states of all ages
        0..N-1 rather than all streams being as old as the pass is far along. 0: reset all
        streams at the start of each pass (the default). Evaluation streams: reset all at
        segments 0, M, 2M, ... (M = eval_segments; 0: only at segment 0)."""
        for flag, n in (("--fwp-carry-reset-segments", segments), ("--fwp-eval-reset-segments", eval_segments)):
            if n < 0:
                raise ValueError(f"{flag}: must be >= 0, got {n}")
        self.carry_reset_segments = int(segments)
        self.eval_reset_segments = int(eval_segments)
        self._train_segments = 0

    def reset_fast_weights(self, slot=None):
        """Forget the carried fast weights of "train" or "eval" streams (None: both)."""
        for layer in self.fast_self_attention():
            layer.reset_carried_state(slot)
        nxt = self.__dict__.setdefault("_next_segment", {})
        if slot is None:
            nxt.clear()
        else:
            nxt.pop(slot, None)

    def _begin_segment(self, segment, bsz):
        slot = "train" if self.training else "eval"
        expected = self._next_segment.get(slot)
        staggered = slot == "train" and self.carry_reset_segments > 0
        if staggered:  # a gap restarts the streams; a new pass (segment 0) continues them
            restart = segment != expected and segment != 0
        else:
            restart = segment == 0 or segment != expected
        scheduled = slot == "eval" and self.eval_reset_segments > 0 and segment % self.eval_reset_segments == 0
        if restart or scheduled:
            if restart and segment != 0:
                logger.info(f"carried fast weights ({slot}) restart from zero at segment {segment}")
            self.reset_fast_weights(slot)
        self._next_segment[slot] = segment + 1
        if staggered:
            n = self.carry_reset_segments
            rows = (self._train_segments + torch.arange(bsz) * n // bsz) % n == 0
            for layer in self.fast_self_attention():
                layer.reset_carried_rows(rows, slot)
            self._train_segments += 1

    def forward(self, src_tokens, *args, stream_segment=None, **kwargs):
        if self.carry_state:
            if stream_segment is None:
                raise ValueError("--fwp-carry-state: batches must be stream segments (task fwp_stream_lm)")
            self._begin_segment(int(stream_segment), src_tokens.size(0))
        return super().forward(src_tokens, *args, **kwargs)


def _no_future_mask(tensor):
    return None


def fwp_lm_base(args):
    """Defaults for named architectures (--arch fwp_lm itself takes FwpLMConfig's defaults)."""
    set_fwp_defaults(args, FwpLMConfig)
    base_lm_architecture(args)


def _wiki103(args, dim):
    """Paper Table 2: 16 layers, 8 heads, FFN 2048, dropout 0.1, adaptive input and softmax with
    div 1 (factor 1) and tied weights. Context (--tokens-per-sample 256 / 384) is a task flag."""
    cutoff = "20000,40000,200000"
    set_defaults(args, decoder_layers=16, decoder_embed_dim=dim, decoder_input_dim=dim,
                 decoder_output_dim=dim, decoder_attention_heads=8, decoder_ffn_embed_dim=2048,
                 dropout=0.1, attention_dropout=0.0, adaptive_input=True, adaptive_input_factor=1,
                 adaptive_input_cutoff=cutoff, adaptive_softmax_cutoff=cutoff, adaptive_softmax_factor=1,
                 adaptive_softmax_dropout=0.0, tie_adaptive_weights=True, tie_adaptive_proj=True)
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
    set_defaults(args, decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4,
                 decoder_ffn_embed_dim=64)
    fwp_lm_base(args)


@register_model_architecture("fwp_lm", "fwp_lm_gated_deltanet")
def fwp_lm_gated_deltanet(args):
    """fairseq's transformer_lm sizes with the Gated DeltaNet layer (presets.py) in every layer."""
    set_defaults(args, **GATED_DELTANET)
    fwp_lm_base(args)
