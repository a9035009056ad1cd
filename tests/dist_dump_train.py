"""fairseq-train that, once training ends, saves this worker's model state (parameters and
buffers, FAVOR+ draws included) to $FWP_DUMP_DIR/rank<RANK>.pt, for test_distributed.py to
compare across workers. Run it where fairseq-train would run, e.g. under torchrun."""
import os
import sys

import torch
from fairseq import trainer as trainer_module
from fairseq_cli import train

_trainers = []
_init = trainer_module.Trainer.__init__


def _recording_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    _trainers.append(self)


if __name__ == "__main__":
    trainer_module.Trainer.__init__ = _recording_init
    sys.argv[0] = "fairseq-train"
    train.cli_main()
    model = _trainers[-1].get_model()  # unwrapped from DistributedDataParallel
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state["_num_updates"] = torch.tensor(_trainers[-1].get_num_updates())
    torch.save(state, os.path.join(os.environ["FWP_DUMP_DIR"], f"rank{os.environ.get('RANK', '0')}.pt"))
