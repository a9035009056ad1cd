"""fairseq-train with --bf16 on the CPU.

fairseq's --bf16 implies --tpu (torch_xla), so `fairseq-train --cpu --bf16` stops with
"'NoneType' object has no attribute 'xla_device'". This runs fairseq-train's own main with the
same flags, minus that implication: the model and its gradients in bf16, fp32 master weights
(fairseq's FP16Optimizer), on the CPU.

    python scripts/train_cpu_bf16.py DATA --user-dir fwp_fairseq --cpu --bf16 [fairseq-train flags]
"""
import sys

from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import train


def main(argv=None):
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    if args.cpu:
        args.tpu = False  # fairseq set it for --bf16; there is no TPU here
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)


if __name__ == "__main__":
    main(sys.argv[1:])
