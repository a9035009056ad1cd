"""FastWeightAttention: a drop-in for fairseq's MultiheadAttention (same forward signature,
T x B x C in and out, returns (output, None)) that attends through fast weights.

Three uses (arXiv 2102.11174, sections 2-4):
- causal self-attention (decoder): sum or delta rule, W carried step to step;
- non-causal self-attention (encoder) and encoder-decoder attention: all (unpadded) keys are
  written with the sum rule, then every query reads. The update rule does not apply here.

There is no attention matrix, so attention dropout, attn_mask (causality is structural) and
need_weights do not apply; the returned weights are always None.

Short sequences run in the cheaper association order, chosen by the ops (ops/plan.py).
The causal recurrence continues from a prior state (S, z) when there is one: in incremental
decoding, fairseq's incremental state holds an ops FactoredState (S as the written keys and
values while smaller than S, then S; z with the attention normaliser); with set_carry_state (task
fwp_stream_lm) the state carries over from one segment to the next (carried_state.py).
Encoder-decoder attention builds its state once from the encoder output and reuses it at every
decoding step.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fairseq.incremental_decoding_utils import with_incremental_state

from ..ops import (UPDATES, FactoredState, fast_weight_delta, fast_weight_delta_product, fast_weight_noncausal,
                   fast_weight_sum)
from .beam_memory import GROUP_KEY, beams_apart, beams_together, one_row_per_sentence, reorder_buffer
from .carried_state import CarriedState, CarriesState
from .feature_maps import (FEATURE_MAPS, FavorFeatureMap, build_feature_map,
                           resolve_normalisation)
from .gate import BETA_SCALE, ScalarGate, check_gate_options
from .householder import ExtraWrites, check_householder_options, interleave
from .normaliser import key_sums
from .output_norm import OutputNorm, check_output_norm
from .short_conv import ShortConvolution
from .precision import recurrence_dtype, to_accumulation


@with_incremental_state
class FastWeightAttention(CarriesState, nn.Module):
    """feature_map: a name in FEATURE_MAPS; update: the rule of causal attention ("sum" or
    "delta"); attn_normalize, sum_norm, l2_norm: see resolve_normalisation (None: default);
    gate ("none" / "scalar") and beta_range ("unit" / "double"), causal attention only: gate.py;
    householder: delta-rule writes per token (DeltaProduct, causal delta rule only): householder.py;
    short_conv (kernel, 0: none), self-attention only (causal, or centred where not causal):
    short_conv.py (with householder > 1 the extra writes' keys and values get their own);
    output_norm ("none", "rms", "rms-gated"): output_norm.py (with it, the attention normaliser
    is off)."""

    def __init__(self, embed_dim, num_heads, kdim=None, vdim=None, self_attention=False,
                 encoder_decoder_attention=False, causal=False, feature_map="linear", update="sum",
                 dpfp_nu=1, performer_features=16, attn_normalize=None, sum_norm=None,
                 l2_norm=False, seed=1, impl="auto", eps=1e-5, gate="none", beta_range="unit",
                 householder=1, short_conv=0, output_norm="none"):
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim: {embed_dim} must be divisible by num_heads ({num_heads})")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
        if update not in UPDATES:
            raise ValueError(f"update: expected one of {UPDATES}, got {update!r}")
        if self_attention == encoder_decoder_attention:
            raise ValueError("exactly one of self_attention and encoder_decoder_attention must be set")
        if causal and not self_attention:
            raise ValueError("causal: only self-attention can be causal")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention
        self.causal = causal
        self.feature_map_name = feature_map
        # Non-causal attention writes every key before reading: the sum rule, whatever `update`.
        self.update = update if causal else "sum"
        check_gate_options(gate, beta_range, self.update, causal)
        self.beta_range = beta_range
        attn_normalize = check_output_norm(output_norm, attn_normalize)
        if short_conv and not self_attention:
            raise ValueError("short_conv: only self-attention has one (0 turns it off)")
        self.attn_normalize, self.phi_norm = resolve_normalisation(
            feature_map, self.update, attn_normalize, sum_norm, l2_norm)
        check_householder_options(householder, self.update, causal, self.attn_normalize)
        self.num_householder = householder
        self.impl = impl
        self.eps = eps
        self.feature_map = build_feature_map(feature_map, self.head_dim, dpfp_nu, performer_features, seed)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(self.kdim, embed_dim)
        self.v_proj = nn.Linear(self.vdim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # beta_t = sigmoid(w_beta . x_t): one scalar per head and step, no bias (the paper).
        self.beta_proj = nn.Linear(embed_dim, num_heads, bias=False) if self.update == "delta" else None
        # No parameters without the gate: the paper's checkpoints keep their keys.
        self.gate = ScalarGate(embed_dim, num_heads) if gate == "scalar" else None
        # Writes 1..N-1 of DeltaProduct; N = 1: none (no parameters, old checkpoints unchanged).
        self.extra_writes = ExtraWrites(embed_dim, num_heads, householder, short_conv) if householder > 1 else None
        self.short_conv = ShortConvolution(3 * embed_dim, short_conv, causal) if short_conv else None
        self.output_norm = (OutputNorm(output_norm, embed_dim, num_heads, self.head_dim, eps)
                            if output_norm != "none" else None)
        self.num_updates = 0
        self.beam_size = 1  # set_beam_size
        self.carry_state = False  # set_carry_state
        self._carried = CarriedState()
        self._carried_conv = CarriedState()  # the short convolution's last inputs
        self._carried_extra_conv = CarriedState()  # those of the extra writes' convolution
        self.reset_parameters()

    def reset_parameters(self):
        # Same scheme as fairseq's attention, so that swapping the layer keeps the model's scale.
        gain = 2 ** -0.5 if self.kdim == self.embed_dim and self.vdim == self.embed_dim else 1.0
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.constant_(proj.bias, 0.0)
        if self.beta_proj is not None:
            nn.init.xavier_uniform_(self.beta_proj.weight)
        if self.extra_writes is not None:
            self.extra_writes.reset_parameters(gain)

    def extra_repr(self):
        return (f"feature_map={self.feature_map_name}, update={self.update}, causal={self.causal}, "
                f"attn_normalize={self.attn_normalize}, phi_norm={self.phi_norm}, "
                f"d_dot={self.feature_map.out_dim}, gate={'none' if self.gate is None else 'scalar'}, "
                f"beta_range={self.beta_range}"
                + (f", householder={self.num_householder}" if self.num_householder > 1 else ""))

    def _carried_states(self):
        return (self._carried, self._carried_conv, self._carried_extra_conv)

    # -- fairseq hooks -------------------------------------------------------------------
    def set_num_updates(self, num_updates):
        """Called by the trainer at every update: FAVOR+ draws number `num_updates` in training."""
        self.num_updates = int(num_updates)

    def set_beam_size(self, beam_size):
        """fairseq's SequenceGenerator says its beam size: encoder-decoder attention then keeps
        one memory per sentence for all its beams (beam_memory.py)."""
        self.beam_size = int(beam_size)

    def _get_input_buffer(self, incremental_state) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "fw_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state, buffer):
        return self.set_incremental_state(incremental_state, "fw_state", buffer)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Beam search: select (and possibly drop) rows of the batch in every cached tensor
        (the fast weights' state and the short convolutions' tails); a memory shared by a
        sentence's beams only drops finished sentences (beam_memory.py)."""
        for name in ("fw_state", "conv_tail", "extra_conv_tail"):
            buffer = self.get_incremental_state(incremental_state, name)
            if buffer:
                reorder_buffer(buffer, new_order)
                incremental_state = self.set_incremental_state(incremental_state, name, buffer)
        return incremental_state

    # -- forward -------------------------------------------------------------------------
    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None,
                need_weights=True, static_kv=False, attn_mask=None, before_softmax=False,
                need_head_weights=False):
        if before_softmax:
            raise ValueError("before_softmax: fast-weight attention has no attention logits")
        if self.self_attention and key is None:
            key = value = query
        cached = self._static_state(incremental_state, static_kv)
        if cached is not None:
            key = value = key_padding_mask = None  # decoding: the state built at step one is reused
        self._check(query, key, value, key_padding_mask)
        shared = None
        if static_kv and incremental_state is not None and key is not None and not self.causal:
            shared = one_row_per_sentence(key, value, key_padding_mask, self.beam_size)
            if shared is not None:  # beam search: one memory per sentence
                key, value, key_padding_mask = shared
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if self.training and isinstance(self.feature_map, FavorFeatureMap):
            # Redrawn every training update from (seed, update number): identical on all workers.
            self.feature_map.redraw(self.num_updates)
        tgt_len, bsz, _ = query.shape
        # The projections run under the caller's autocast. From phi to the output it is off: it
        # would run the recurrence's products in half and cast the fp32 state and normalisers down.
        if self.short_conv is not None:  # self-attention: key and value are the query
            qp, kv = self._convolve(query, key_padding_mask, incremental_state)
        else:
            qp = self.q_proj(query)
            kv = None if key is None else (self.k_proj(key), self.v_proj(value))
        dev = query.device.type
        with torch.autocast(dev, enabled=False):
            q = self._phi(self._heads(qp, bsz))
            k, v = (None, None) if kv is None else self._keys_values(*kv, key_padding_mask, key.size(1))
            if cached is not None:
                out = self._read(q, cached)
            elif self.causal:
                out = self._causal(q, query, k, v, incremental_state, key_padding_mask)
            else:
                out = self._noncausal(q, k, v, incremental_state if static_kv else None,
                                      None if shared is None else self.beam_size)
            if self.output_norm is not None:  # it returns the (T, B, C) layout
                out = self.output_norm(out, query)
            else:
                out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        return self.out_proj(out.to(qp.dtype)), None

    def _check(self, query, key, value, key_padding_mask):
        if query.dim() != 3 or query.size(-1) != self.embed_dim:
            raise ValueError(f"query: expected (T, B, {self.embed_dim}), got {tuple(query.shape)}")
        if key is not None:
            if key.dim() != 3 or key.size(-1) != self.kdim or key.size(1) != query.size(1):
                raise ValueError(f"key: expected (S, {query.size(1)}, {self.kdim}), got {tuple(key.shape)}")
            if value is None or value.shape[:2] != key.shape[:2] or value.size(-1) != self.vdim:
                raise ValueError(f"value: expected ({key.size(0)}, {key.size(1)}, {self.vdim}), "
                                 f"got {None if value is None else tuple(value.shape)}")
            if key_padding_mask is not None and tuple(key_padding_mask.shape) != (key.size(1), key.size(0)):
                raise ValueError(f"key_padding_mask: expected {(key.size(1), key.size(0))}, "
                                 f"got {tuple(key_padding_mask.shape)}")

    def _convolve(self, x, key_padding_mask, incremental_state):
        """--fwp-short-conv: the q, k, v projections of x through the causal convolution,
        continuing from the tail that decoding or the carried state kept (none: zeros before the
        start)."""
        tail = self._conv_tail_in("conv_tail", self._carried_conv, incremental_state, x.size(1))
        (q, k, v), tail = self.short_conv([self.q_proj(x), self.k_proj(x), self.v_proj(x)], tail,
                                          key_padding_mask)
        self._conv_tail_out("conv_tail", self._carried_conv, incremental_state, tail)
        return q, (k, v)

    def _conv_tail_in(self, name, carried, incremental_state, bsz):
        """A short convolution's last inputs to continue from: the decoding buffer `name`, the
        CarriedState `carried`, or None (zeros before the start)."""
        if incremental_state is not None:
            return (self.get_incremental_state(incremental_state, name) or {}).get("tail")
        if self.carry_state:
            return carried.load(self._carry_slot(), bsz)[0]
        return None

    def _conv_tail_out(self, name, carried, incremental_state, tail):
        """Keep a short convolution's new tail where _conv_tail_in will look for it."""
        if incremental_state is not None:
            self.set_incremental_state(incremental_state, name, {"tail": tail})
        elif self.carry_state:
            carried.store(self._carry_slot(), tail, None)

    def _heads(self, x, bsz):
        """(T, B, H*D) -> (B, H, T, D)."""
        return x.view(x.size(0), bsz, self.num_heads, -1).permute(1, 2, 0, 3)

    def _phi(self, x):
        # In fp32 for half inputs: DPFP squares x (|x| ~ 1e3 gives 1e6, past fp16's range),
        # FAVOR+ exponentiates, and the normalising sum runs over d_dot features.
        dtype = x.dtype
        x = self.feature_map.normalised(to_accumulation(x), self.phi_norm, self.eps)
        return x.to(recurrence_dtype(dtype))

    def _keys_values(self, kp, vp, key_padding_mask, bsz):
        """Projected keys and values -> phi(k), v in heads."""
        k = self._phi(self._heads(kp, bsz))
        v = self._heads(vp, bsz).to(k.dtype)  # the ops want one dtype
        if key_padding_mask is not None:
            # A zero key writes nothing (sum and delta rule alike) and adds nothing to z.
            k = k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        return k, v

    def _read(self, q, memory):
        """Every query reads a FactoredState (decoding: encoder-decoder memory, one causal step).
        A memory with fewer rows than q is shared by each sentence's beams (beam_memory.py)."""
        rows = (memory.keys if memory.factored else memory.matrix).size(0)
        beam = q.size(0) // rows
        if beam > 1:
            return beams_apart(self._read(beams_together(q, rows), memory), beam)
        return self._normalise(memory.read(q), q, memory.z) if memory.z is not None else memory.read(q)

    def _normalise(self, o, q, z):
        """o / (z . phi(q) + eps); z is (B, H, T or 1, d_dot) in fp32."""
        den = (to_accumulation(q) * z).sum(-1, keepdim=True) + self.eps
        return (to_accumulation(o) / den).to(o.dtype)

    # -- non-causal: write all keys, then read ------------------------------------------
    def _static_state(self, incremental_state, static_kv):
        """Encoder-decoder attention while decoding: the FactoredState built from the encoder
        output at the first step (None before it, and for every other use)."""
        if self.causal or not static_kv or incremental_state is None:
            return None
        return FactoredState.from_buffer(self._get_input_buffer(incremental_state))

    def _noncausal(self, q, k, v, cache, beam=None):
        """cache: the incremental state to keep the encoder-decoder memory in, or None; beam:
        the beams per sentence when k and v hold one row per sentence."""
        if cache is not None:
            memory = FactoredState.written(k, v, with_z=self.attn_normalize)
            buffer = memory.to_buffer()
            if beam is not None:
                buffer[GROUP_KEY] = torch.tensor(beam)
            self._set_input_buffer(cache, buffer)
            return self._read(q, memory)
        out, _ = fast_weight_noncausal(q, k, v)
        return self._normalise(out, q, to_accumulation(k).sum(2, True)) if self.attn_normalize else out

    # -- causal: the sum or delta rule, continuing from a prior state ---------------------
    def _causal(self, q, query, k, v, incremental_state, key_padding_mask=None):
        memory = self._state_in(incremental_state, q.size(0))
        keep = incremental_state is not None or self.carry_state
        z = z_before = None
        g = None if self.gate is None else self.gate(query)  # (B, H, T) log-decays
        if self.attn_normalize:  # z_t = a_t z_{t-1} + phi(k_t), and a_t z_{t-1}
            z, z_before = key_sums(to_accumulation(k), g, None if memory is None else memory.z)
        beta = None
        if self.update == "delta":
            beta = torch.sigmoid(self.beta_proj(query)).permute(1, 2, 0)  # (B, H, T)
            if self.beta_range != "unit":
                beta = BETA_SCALE[self.beta_range] * beta
            if z is not None:
                k, beta = self._normalised_delta_inputs(k, beta, z_before)
            beta = beta.to(q.dtype)
        if self.extra_writes is not None:
            k, v, beta = self._product_writes(query, k, v, beta, key_padding_mask, incremental_state)
        step = incremental_state is not None and q.size(2) == 1
        out, memory = self._write_read(q, k, v, beta, g, memory, step, keep)
        if keep:
            memory.z = None if z is None else z[:, :, -1:].clone()  # not a view of every step's z
            self._state_out(incremental_state, memory)
        return out if z is None else self._normalise(out, q, z)

    def _write_read(self, q, k, v, beta, g, memory, step, keep):
        """Sum (beta None) or delta rule, gated by log-decays g or not, from `memory` -> (o,
        final state when keep). An ungated decoding step appends to the FactoredState (exact);
        a sequence, or a gated step (the factors hold no decays), runs the ops from memory's S."""
        if step and g is None:
            memory = FactoredState() if memory is None else memory
            for j in range(k.size(2)):  # DeltaProduct: the token's N writes, in order
                w = slice(j, j + 1)
                memory = memory.append(k[:, :, w], v[:, :, w], None if beta is None else beta[:, :, w])
            return memory.read(q), memory
        state0 = None if memory is None else memory.as_matrix()
        gated = {} if g is None else {"g": g}  # fp32 log-decays, as z decays by (never rounded to q.dtype)
        if self.extra_writes is not None:
            out, state = fast_weight_delta_product(q, k, v, beta, self.num_householder, initial_state=state0,
                                                   output_final_state=keep, impl=self.impl, **gated)
        elif beta is None:
            out, state = fast_weight_sum(q, k, v, initial_state=state0, output_final_state=keep,
                                         impl=self.impl, **gated)
        else:
            out, state = fast_weight_delta(q, k, v, beta, initial_state=state0,
                                           output_final_state=keep, impl=self.impl, **gated)
        return out, (FactoredState(matrix=state) if keep else None)

    def _product_writes(self, query, k, v, beta, key_padding_mask, incremental_state):
        """DeltaProduct: the token's first write (k, v, beta (B, H, T, ...)) and writes 1..N-1
        from extra_writes (their keys and values convolved with --fwp-short-conv, continuing
        from the tail kept as the layer's own), interleaved to T*N steps (householder.interleave)."""
        conv = self.extra_writes.short_conv is not None
        tail = self._conv_tail_in("extra_conv_tail", self._carried_extra_conv, incremental_state,
                                  query.size(1)) if conv else None
        kp, vp, logits, tail = self.extra_writes(query, tail, key_padding_mask)
        if conv:
            self._conv_tail_out("extra_conv_tail", self._carried_extra_conv, incremental_state, tail)
        B, H, T, n = logits.shape
        k2 = self._phi(kp.reshape(B, H, T * n, -1)).view(B, H, T, n, -1)
        if key_padding_mask is not None:  # a padded token writes nothing, as its first write
            k2 = k2.masked_fill(key_padding_mask[:, None, :, None, None], 0.0)
        beta2 = BETA_SCALE[self.beta_range] * torch.sigmoid(logits)
        return interleave(k, k2), interleave(v, vp), interleave(beta, beta2)

    def _state_in(self, incremental_state, bsz):
        """The FactoredState to continue from: decoding buffer, carried state, or None (W = 0)."""
        if incremental_state is not None:
            return FactoredState.from_buffer(self._get_input_buffer(incremental_state))
        if self.carry_state:
            state, z = self._carried.load(self._carry_slot(), bsz)
            return None if state is None else FactoredState(matrix=state, z=z)
        return None

    def _state_out(self, incremental_state, memory):
        """Keep the final state where _state_in will look for it."""
        if incremental_state is not None:
            self._set_input_buffer(incremental_state, memory.to_buffer())
        else:
            self._carried.store(self._carry_slot(), memory.as_matrix(), memory.z)

    def _normalised_delta_inputs(self, k, beta, z_prev):
        """The delta rule with v_bar_t = W_{t-1} phi(k_t) / (z_{t-1} . phi(k_t)) is the plain
        delta rule on k' = k / d_t, beta' = beta * d_t with d_t = z_{t-1} . phi(k_t), since
        beta' k' = beta k. Where nothing was written yet W_{t-1} = 0 and any d works: use 1.
        z_prev: key_sums' z_before, a_t z_{t-1} with a gate (the normaliser of the decayed read
        a_t W_{t-1})."""
        kf = to_accumulation(k)
        d = (z_prev * kf).sum(-1)
        d = torch.where(z_prev.sum(-1) > 0, d.clamp_min(self.eps), torch.ones_like(d))
        return (kf / d[..., None]).to(k.dtype), to_accumulation(beta) * d
