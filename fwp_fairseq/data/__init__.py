"""Datasets of fwp_fairseq (fairseq-facing; imported by the tasks that use them)."""
from .generated import GeneratedDataset
from .stream_dataset import StreamSegments, TokenStream

__all__ = ["GeneratedDataset", "TokenStream", "StreamSegments"]
