"""Multi-process training on the CPU with torchrun and gloo."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT
from nanogpt.checkpoint import load_checkpoint
from nanogpt.data import BatchLoader
from nanogpt.loading import model_from_checkpoint

pytestmark = pytest.mark.slow

MODEL_ARGS = ["--dataset=tiny_char", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32",
              "--block_size=16", "--batch_size=4", "--learning_rate=3e-3", "--warmup_iters=2", "--eval_iters=2",
              "--log_interval=1", "--bias=False"]


def launch(nproc, out_dir, data_root, *args, wait=True):
    env = {**os.environ, "NANOGPT_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py"]
    cmd += MODEL_ARGS + [f"--out_dir={out_dir}", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def fixed_batch_loss(ckpt_path, data_dir):
    model = model_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path).eval()
    loader = BatchLoader(data_dir, 16, 16, "cpu", seed=99)
    x, y = loader.eval_batch("val", torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x, y)[1].item()


def test_two_processes_match_one_with_the_same_global_batch(char_dataset, tmp_path):
    steps = ["--max_iters=6", "--lr_decay_iters=6", "--eval_interval=1000", "--gradient_accumulation_steps=2"]
    one = launch(1, tmp_path / "one", char_dataset.parent, *steps)
    assert one.returncode == 0, one.stderr
    two = launch(2, tmp_path / "two", char_dataset.parent, *steps)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es)" in two.stdout
    assert two.stdout.count("iter 6:") == 1  # only rank 0 logs
    # one checkpoint, no temp files (train.lock is the out_dir lock, which stays: see OutDirLock)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != "train.lock") == ["ckpt.pt"]
    loss_one = fixed_batch_loss(tmp_path / "one" / "ckpt.pt", char_dataset)
    loss_two = fixed_batch_loss(tmp_path / "two" / "ckpt.pt", char_dataset)
    assert abs(loss_one - loss_two) <= 1e-4
    logged = [[float(line.split("loss ")[1].split(",")[0]) for line in out.splitlines() if line.startswith("iter ")]
              for out in (one.stdout, two.stdout)]
    assert len(logged[0]) == len(logged[1]) == 7
    assert all(abs(a - b) <= 1e-4 for a, b in zip(*logged))


def test_accumulation_not_divisible_by_ranks(char_dataset, tmp_path):
    r = launch(2, tmp_path / "x", char_dataset.parent, "--gradient_accumulation_steps=3", "--max_iters=1")
    assert r.returncode != 0
    assert "gradient_accumulation_steps=3 is not divisible by the 2 processes: use a multiple of 2" in r.stdout + r.stderr


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _rank_of(pid):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_killed_rank_makes_the_others_exit_and_the_checkpoint_resumes(char_dataset, tmp_path):
    out = tmp_path / "kill"
    proc = launch(2, out, char_dataset.parent, "--max_iters=100000", "--eval_interval=5",
                  "--gradient_accumulation_steps=2", "--ddp_timeout=30", wait=False)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 12:"):
            break
    assert (out / "ckpt.pt").exists(), "".join(lines)
    rank1 = [p for p in _children(proc.pid) if _rank_of(p) == 1]
    assert rank1, "could not find rank 1"
    killed_at = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    elapsed = time.time() - killed_at
    assert proc.returncode != 0
    assert elapsed < 90, f"the surviving rank took {elapsed:.0f}s to exit"
    assert "error" in rest.lower() or "failed" in rest.lower()
    ckpt = load_checkpoint(out / "ckpt.pt")  # rank 0's last checkpoint is intact
    assert ckpt["iter_num"] >= 5
    resumed = launch(1, out, char_dataset.parent, "--init_from=resume", f"--max_iters={ckpt['iter_num'] + 2}",
                     "--eval_interval=1000", "--gradient_accumulation_steps=2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"iter {ckpt['iter_num']}:" in resumed.stdout
