"""What several test files share: paths, the device, sample data, tiny configs and references.

Tests import from here (never from one another, never from conftest.py, which holds only fixtures and the
process setup). The kernels' error measure and tolerances are kernels/testing.py, shared with bench/.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

# kernels run on the GPU where there is one, else on the CPU through Triton's interpreter (conftest.py sets it)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SAMPLE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n") * 40


def write_tokens(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(ids, dtype=np.uint16).tofile(path)


def tiny_config(out_dir, **overrides):
    """A 2-layer, 32-wide TrainConfig on the tiny_char dataset (the char_dataset fixture) that trains in seconds."""
    from nanogpt.config import TrainConfig
    base = dict(dataset="tiny_char", out_dir=str(out_dir), device="cpu", dtype="float32", compile=False,
                n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, gradient_accumulation_steps=1,
                max_iters=100, lr_decay_iters=100, warmup_iters=10, learning_rate=3e-3, min_lr=3e-4,
                eval_interval=50, eval_iters=4, log_interval=1, beta2=0.99, dropout=0.0, bias=False)
    base.update(overrides)
    return TrainConfig(**base)


def run(cfg, logs=None):
    """Train in this process; returns (trainer, what train() returned)."""
    from nanogpt.trainer import Trainer
    trainer = Trainer(cfg, log=(logs.append if logs is not None else lambda *_: None))
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


def run_command(*args, env=None, timeout=300, **kwargs):
    """A command line of the repository (train.py, sample.py, -m bench) in a fresh process."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, **kwargs)


def attention_reference(q, k, v, causal, scale=None, keep=None, dropout_p=0.0, softcap=None, window=None):
    """Explicit float64 attention; `keep` applies a given dropout mask (scaled by 1/(1-p)). k, v may have fewer
    heads than q (GQA: repeated here, so their gradients sum over the group); causal and window=(left, right)
    (-1 or None: unbounded) are aligned bottom-right as in FlashAttention; softcap caps the scaled scores; a
    query that sees no key outputs 0."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    Tq, Tk = q.shape[-2], k.shape[-2]
    rel = torch.arange(Tk, device=q.device)[None, :] - torch.arange(Tq, device=q.device)[:, None] - (Tk - Tq)
    left, right = [-1 if w is None else w for w in (window or (-1, -1))]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= rel <= 0
    if right >= 0:
        visible &= rel <= right
    if left >= 0:
        visible &= rel >= -left
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v


TINY_MODEL = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def tiny_model_pair(attn_a, attn_b, **overrides):
    """Two TINY_MODEL GPTs with the same weights, on two kernel backends."""
    from nanogpt.model import GPT, GPTConfig
    cfg = dict(TINY_MODEL, **overrides)
    torch.manual_seed(0)
    a = GPT(GPTConfig(**cfg, attn=attn_a))
    b = GPT(GPTConfig(**cfg, attn=attn_b))
    b.load_state_dict(a.state_dict())
    return a, b
