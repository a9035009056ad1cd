"""Encoder-decoder memory shared by the beams of a sentence (beam search).

fairseq's SequenceGenerator repeats each sentence's encoder output beam-size times in
consecutive batch rows, and at every step reorders the decoder's cached state by the beams it
kept. The encoder-decoder memory (the state written from the encoder output) is the same for
every beam of a sentence, so it is kept once per sentence: built from one row per sentence,
read by all of the sentence's beams at once, and left in place when beam search only reorders
beams within their sentences (fairseq's MultiheadAttention does the same, after set_beam_size).
Only when sentences finish are rows dropped.

A shared memory is marked in the incremental-state buffer by GROUP_KEY (the beams per
sentence); a buffer without it holds one row per batch row and is reordered row by row."""
import torch

GROUP_KEY = "fw_beam"


def one_row_per_sentence(key, value, key_padding_mask, beam):
    """(key, value, key_padding_mask) (T, B, C) / (B, T) with one row per sentence when every
    group of `beam` consecutive rows holds the same sentence, else None (then nothing is shared)."""
    if beam <= 1 or key.size(1) % beam != 0:
        return None
    picked = []
    for x, dim in ((key, 1), (value, 1), (key_padding_mask, 0)):
        if x is None:
            picked.append(None)
            continue
        groups = x.unflatten(dim, (-1, beam))
        first = groups.narrow(dim + 1, 0, 1)
        if not torch.equal(groups, first.expand_as(groups)):
            return None
        picked.append(first.squeeze(dim + 1))
    return tuple(picked)


def beams_together(q, sentences):
    """(B * beam, H, T, D) -> (B, H, beam * T, D): a sentence's beams read its memory at once."""
    rows, heads, steps, dim = q.shape
    beam = rows // sentences
    return q.view(sentences, beam, heads, steps, dim).transpose(1, 2).reshape(sentences, heads, beam * steps, dim)


def beams_apart(o, beam):
    """The inverse of beams_together: (B, H, beam * T, D) -> (B * beam, H, T, D)."""
    sentences, heads, steps, dim = o.shape
    return o.view(sentences, heads, beam, steps // beam, dim).transpose(1, 2).reshape(
        sentences * beam, heads, steps // beam, dim)


def reorder_buffer(buffer, new_order):
    """Beam search kept rows `new_order` of the batch: update the buffer's tensors in place.
    A shared memory stays untouched while every sentence keeps its rows (reordering beams
    within a sentence); finished sentences drop their row; rows that mix sentences (not done by
    fairseq's SequenceGenerator) get one memory row each again."""
    tensors = [name for name, x in buffer.items() if x is not None and name != GROUP_KEY]
    order = new_order
    if GROUP_KEY in buffer:
        beam = int(buffer[GROUP_KEY])
        sentence = new_order // beam  # the sentence each new row belongs to
        kept = buffer[tensors[0]].size(0)
        groups = sentence.view(-1, beam) if new_order.numel() % beam == 0 else None
        if groups is not None and torch.equal(groups, groups[:, :1].expand_as(groups)):
            order = groups[:, 0]
            if order.numel() == kept and torch.equal(order, torch.arange(kept, device=order.device)):
                return  # the same sentences in the same rows: nothing to copy
        else:
            order = sentence
            del buffer[GROUP_KEY]
    for name in tensors:
        buffer[name] = buffer[name].index_select(0, order)
