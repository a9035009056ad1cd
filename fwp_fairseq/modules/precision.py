"""The dtypes the attention layer computes in, around the ops' fp32 (fp64) state."""
import torch

from ..ops import accumulation_dtype


def to_accumulation(x):
    """x in the dtype the fast-weight state accumulates in: fp64 stays fp64, the rest is fp32.
    Feature maps, normalisers and sums over many features use it for half inputs."""
    return x.to(accumulation_dtype(x.dtype))


def recurrence_dtype(dtype):
    """dtype of phi(q), phi(k) and v entering the recurrence (the ops keep the state in fp32
    whatever it is): fp16 lacks the range for unnormalised features and for outputs that grow
    with T, so it runs in fp32; bf16 has fp32's range and stays bf16."""
    return torch.float32 if dtype == torch.float16 else dtype
