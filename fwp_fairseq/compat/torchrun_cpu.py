"""fairseq 0.12 under torchrun on CPU (e.g. ``torchrun --nproc_per_node 2 fairseq-train ... --cpu
--distributed-backend gloo``): it ignores torchrun's WORLD_SIZE unless --distributed-world-size
is given too (CPU-only machines default to 1, so every process trains alone on the same
files), and it then computes ``rank % torch.cuda.device_count()``, a division by zero without
CUDA. Scoped fix, installed when fairseq loads --user-dir (before it sets up distributed
training): take the world size from torchrun's environment when the command line left it at
1, and use device 0 when there is no CUDA device. Nothing changes under CUDA or without torchrun."""
import os

import torch

from .source_probe import probe_source

_TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def needed():
    """fairseq's torchrun set-up still indexes CUDA devices (the division by zero on CPU)."""
    from fairseq.distributed import utils
    return probe_source("torchrun_cpu", utils._infer_torch_distributed_launch_init,
                        lambda source: "device_count()" in source, if_unreadable=False,
                        why="the fix replaces fairseq's own torchrun set-up, while without it "
                            "the problem is a loud error (division by zero) under torchrun on CPU")


def install():
    from fairseq.distributed import utils
    if getattr(utils, "_fwp_torchrun_cpu", False):
        return
    infer_init_method = utils.infer_init_method
    launch_init = utils._infer_torch_distributed_launch_init

    def _infer_init_method(cfg, force_distributed=False):
        if (cfg.distributed_init_method is None and all(k in os.environ for k in _TORCHRUN_ENV)
                and cfg.distributed_world_size == 1 and int(os.environ["WORLD_SIZE"]) > 1):
            cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        return infer_init_method(cfg, force_distributed)

    def _launch_init(cfg):
        if torch.cuda.device_count() > 0:
            return launch_init(cfg)
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = 0  # CPU: no device to pick
        cfg.distributed_no_spawn = True  # torchrun started the processes

    utils.infer_init_method = _infer_init_method
    utils._infer_torch_distributed_launch_init = _launch_init
    utils._fwp_torchrun_cpu = True
