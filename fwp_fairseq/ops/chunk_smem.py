"""Which configuration of the chunk kernels fits the device's shared memory per block.

The chunk kernels (csrc/chunk_fwd.cu, chunk_bwd.cu) keep a whole chunk in shared memory: up to
159 KiB per block in their preferred configuration, more than sm_86 and sm_89 GPUs allow (99 KiB;
sm_80 163 KiB, sm_90 227 KiB). The extension lists the configurations it compiles (chunk length,
value tile), preferred first, and counts each pass's bytes with the kernels' own layout code; the
device's opt-in limit comes from the device (cudaDevAttrMaxSharedMemoryPerBlockOptin), the same
number the extension's launch guard checks. This module takes the first configuration that fits,
or says why none does, so that the caller runs the sequential kernel instead.
"""
import logging

log = logging.getLogger(__name__)
_logged = set()
_chosen = {}


def choose_config(ext, like, Dk, Dv, delta, backward):
    """((chunk, tile), None) for the first configuration whose forward (and, if `backward`, also
    backward) pass fits the current device, else (None, reason). `like`: a tensor of the input
    dtype; Dk, Dv: the kernel's (padded) sizes; `ext`: the extension or the CPU emulator."""
    limit = ext.device_smem_optin()
    key = (id(ext), limit, like.dtype, Dk, Dv, delta, backward)
    if key not in _chosen:  # a few calls into the extension, once per shape and device limit
        _chosen[key] = _first_fitting(ext, like, Dk, Dv, delta, backward, limit)
    config, why, note = _chosen[key]
    if note:
        _log_once(logging.INFO, note)
    return config, why


def _first_fitting(ext, like, Dk, Dv, delta, backward, limit):
    """(config, None, note) or (None, reason, None); note says why a smaller one was taken."""
    passes = (False, True) if backward else (False,)
    needs = []
    for chunk, tile in ext.chunk_configs(Dk, Dv):
        need = max(ext.chunk_smem(like, delta, b, Dk, chunk, tile) for b in passes)
        needs.append(need)
        if 0 <= need <= limit:
            note = None
            if len(needs) > 1:
                note = (f"chunk kernels: {_variant(like, Dk, Dv, delta, backward)} needs "
                        f"{needs[0]} bytes of shared memory per block, the device allows {limit}: "
                        f"chunks of {chunk} steps, value tiles of {tile} ({need} bytes)")
            return (chunk, tile), None, note
    why = (f"{_variant(like, Dk, Dv, delta, backward)} needs at least {min(needs)} bytes of shared "
           f"memory per block, the device allows {limit}")
    return None, why, None


def log_fallback(why):
    """Say (once per reason) that a chunk-kernel call runs on the sequential kernel instead."""
    _log_once(logging.WARNING, f"kernel='chunk': {why}; running the sequential kernel instead")


def _variant(like, Dk, Dv, delta, backward):
    rule, run = ("delta" if delta else "sum"), ("backward" if backward else "forward")
    return f"the {rule} rule's {run} (Dk={Dk}, Dv={Dv}, {like.dtype})"


def _log_once(level, msg):
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg)
