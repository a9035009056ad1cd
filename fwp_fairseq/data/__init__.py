"""Datasets of fwp_fairseq (fairseq-facing; imported by the tasks that use them)."""
from .stream_dataset import StreamSegments, TokenStream

__all__ = ["TokenStream", "StreamSegments"]
