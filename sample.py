"""Sample from a trained model (or GPT-2). Examples:

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.txt

Every key and its default: python sample.py --help
"""
import sys

from nanogpt.checkpoint import CheckpointError
from nanogpt.config import ConfigError, SampleConfig, cli_config, validate_sample
from nanogpt.generate import run_sample


def main(argv):
    cfg = cli_config(SampleConfig, argv, "usage: python sample.py [config_file.py ...] [--key=value ...]",
                     validate_sample)
    try:
        run_sample(cfg)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
