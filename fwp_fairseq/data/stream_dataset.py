"""A split's tokens as parallel contiguous streams, cut into consecutive segments.

The split (all lines, each ending with </s>, in file order) is one token sequence x_1..x_N. Its
inputs are </s>, x_1..x_{N-1} and its targets x_1..x_N (as fairseq's language_modeling does
with --sample-break-mode none), so every token is a target exactly once. The sequence is cut
into G = streams_per_shard * num_shards streams of equal length L = ceil(N / G) (the last one
padded); shard s owns streams s*streams_per_shard .. (s+1)*streams_per_shard - 1, whatever the
epoch, so a worker always continues its own streams. Item i is a whole batch: segment i
(positions i*T .. i*T + T - 1) of each of the shard's streams, one stream per batch row. Every
shard has the same number of segments, so distributed workers step together.
"""
import math

import numpy as np
import torch

from fairseq.data import FairseqDataset


def _flat_tokens(data):
    """All tokens of an indexed dataset as one 1-D numpy array, without a copy for fairseq's
    mmap format (its .bin file is exactly the items back to back)."""
    buf, index = getattr(data, "_bin_buffer", None), getattr(data, "_index", None)
    if buf is not None and index is not None:
        return np.frombuffer(buf, dtype=index.dtype, count=int(np.sum(data.sizes)))
    return np.concatenate([np.asarray(data[i]) for i in range(len(data))]) if len(data) else np.zeros(0, np.int64)


class TokenStream(FairseqDataset):
    """One split as a token sequence; ``segments`` gives the batches of one shard."""

    def __init__(self, data, pad, eos):
        self.data = data  # keeps the mmap open: self.tokens may be a view of it
        self.tokens = _flat_tokens(data)
        self.pad, self.eos = pad, eos

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return torch.tensor(int(self.tokens[i]))

    def segments(self, streams_per_shard, segment_len, num_shards=1, shard_id=0):
        return StreamSegments(self, streams_per_shard, segment_len, num_shards, shard_id)


class StreamSegments(FairseqDataset):
    def __init__(self, stream, streams_per_shard, segment_len, num_shards=1, shard_id=0):
        if streams_per_shard < 1 or segment_len < 1:
            raise ValueError(f"streams per worker ({streams_per_shard}) and --tokens-per-sample "
                             f"({segment_len}) must be >= 1")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
        n, g = len(stream.tokens), streams_per_shard * num_shards
        if n < g:
            raise ValueError(f"{n} tokens cannot fill {g} streams ({streams_per_shard} per worker x "
                             f"{num_shards} workers): use fewer streams")
        self.stream, self.bsz, self.seg = stream, streams_per_shard, segment_len
        self.stream_len = math.ceil(n / g)
        self.first = shard_id * streams_per_shard  # global index of this shard's first stream

    def __len__(self):
        return math.ceil(self.stream_len / self.seg)

    def _window(self, start, end):
        """Target positions [start, end) of the sequence: tokens, pad past the end."""
        tok = self.stream.tokens
        out = np.full(end - start, self.stream.pad, dtype=np.int64)
        a, b = max(start, 0), min(end, len(tok))
        if b > a:
            out[a - start:b - start] = tok[a:b]
        if start < 0:  # the input before the first token is </s>
            out[:min(0, end) - start] = self.stream.eos
        return out

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = i * self.seg, min((i + 1) * self.seg, self.stream_len)
        starts = [(self.first + r) * self.stream_len for r in range(self.bsz)]
        tgt = np.stack([self._window(s + lo, s + hi) for s in starts])
        src = np.stack([self._window(s + lo - 1, s + hi - 1) for s in starts])
        src[tgt == self.stream.pad] = self.stream.pad  # past the end: inputs are padding too
        return i, torch.from_numpy(src), torch.from_numpy(tgt)

    def collater(self, items):
        (i, src, tgt), = items  # one item is already a batch
        ntokens = int(tgt.ne(self.stream.pad).sum())
        return {
            "id": torch.arange(self.first, self.first + self.bsz),  # the stream of each row
            "nsentences": self.bsz,
            "ntokens": ntokens,
            "net_input": {"src_tokens": src, "src_lengths": src.ne(self.stream.pad).sum(1),
                          "stream_segment": i},
            "target": tgt,
        }

    def num_tokens(self, index):
        return self.bsz * self.seg

    def size(self, index):
        return self.seg

    def ordered_indices(self):
        return np.arange(len(self))  # in stream order: never shuffled
