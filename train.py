"""Train a GPT. Examples:

    python train.py config/train_shakespeare_char.py
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --max_iters=2000
    python train.py --attn=triton ...
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Every key and its default: python train.py --help
"""
import sys

from nanogpt.checkpoint import CheckpointError
from nanogpt.config import ConfigError, TrainConfig, cli_config, validate_train
from nanogpt.data import DataError
from nanogpt.trainer import Trainer, TrainingDiverged


def main(argv):
    cfg = cli_config(TrainConfig, argv, "usage: python train.py [config_file.py ...] [--key=value ...]",
                     validate_train)
    try:
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
