"""Sample from a trained model (or GPT-2). Examples:

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.txt

Every key and its default: python sample.py --help
"""
import sys

from nanogpt.config import SampleConfig, cli_config, exit_with_error, validate_sample
from nanogpt.errors import UserError, out_of_memory
from nanogpt.sampling import run_sample


def main(argv):
    cfg = cli_config(SampleConfig, argv, "usage: python sample.py [config_file.py ...] [--key=value ...]",
                     validate_sample)
    try:
        run_sample(cfg)
    except UserError as e:  # bad config, checkpoint, data, prompt, pretrained weights: one line, exit 2
        exit_with_error(e)
    except (MemoryError, RuntimeError) as e:  # too large for this machine: one line; a bug re-raises
        exit_with_error(out_of_memory(e))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
