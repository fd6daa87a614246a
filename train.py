"""Train a GPT. Examples:

    python train.py config/train_shakespeare_char.py
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --max_iters=2000
    python train.py --attn=triton ...
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Every key and its default: python train.py --help
"""
import sys

from nanogpt.config import TrainConfig, cli_config, exit_with_error
from nanogpt.errors import UserError, out_of_memory
from nanogpt.trainer import Trainer


def main(argv):
    cfg = cli_config(TrainConfig, argv, "usage: python train.py [config_file.py ...] [--key=value ...]")
    try:
        trainer = Trainer(cfg)  # validates the config (once, knowing the number of processes)
        try:
            trainer.train()
        finally:
            trainer.close()
    except UserError as e:  # bad config, data, checkpoint, pretrained weights, a diverged loss: one line, exit 2
        exit_with_error(e)
    except (MemoryError, RuntimeError) as e:  # too large for this machine: one line; a bug re-raises
        exit_with_error(out_of_memory(e))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
