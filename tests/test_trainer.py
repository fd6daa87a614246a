import errno
import hashlib
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, run, run_command, tiny_config
from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import TrainConfig
from nanogpt.errors import CheckpointError
from nanogpt.trainer import Trainer, TrainingDiverged, get_lr


def test_training_lowers_the_loss_and_resume_continues(char_dataset, tmp_path):
    logs = []
    trainer, result = run(tiny_config(tmp_path / "out"), logs)
    losses = [loss for _, loss in result["history"]]
    assert len(losses) == 101  # iterations 0..max_iters, as nanoGPT
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]
    evals = [line for line in logs if line.startswith("step ")]
    assert evals[0].startswith("step 0:") and evals[-1].startswith("step 100:")
    first_val, last_val = (float(line.rsplit(" ", 1)[1]) for line in (evals[0], evals[-1]))
    assert last_val < first_val - 1.0
    assert any("tok/s" in line and "mfu n/a" in line for line in logs)  # no invented MFU on a CPU

    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 101 and ckpt["config"]["dataset"] == "tiny_char"
    assert set(ckpt) >= {"model", "optimizer", "scaler", "model_args", "iter_num", "best_val_loss", "config",
                         "rng", "sampler"}
    _, resumed = run(tiny_config(tmp_path / "out", init_from="resume", max_iters=110))
    assert resumed["history"][0][0] == 101 and resumed["history"][-1][0] == 110
    assert resumed["history"][0][1] < losses[0] * 0.7  # it continued from the trained weights


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_is_exact(char_dataset, tmp_path, dropout):
    """N+M iterations straight == N, stop, resume to N+M: identical losses at every iteration."""
    common = dict(dropout=dropout, eval_interval=10, lr_decay_iters=30)
    _, straight = run(tiny_config(tmp_path / "a", max_iters=29, **common))
    _, first = run(tiny_config(tmp_path / "b", max_iters=14, **common))
    _, second = run(tiny_config(tmp_path / "b", max_iters=29, init_from="resume", **common))
    assert first["history"] + second["history"] == straight["history"]


def test_separate_best_and_latest_checkpoints(char_dataset, tmp_path):
    run(tiny_config(tmp_path / "o", always_save_checkpoint=False, max_iters=20, eval_interval=10))
    latest = load_checkpoint(tmp_path / "o" / "ckpt.pt")
    best = load_checkpoint(tmp_path / "o" / "best.pt")
    assert latest["iter_num"] == 21 and best["iter_num"] in (10, 20)


def test_nan_loss_stops_with_the_iteration_and_keeps_the_best_checkpoint(char_dataset, tmp_path):
    out = tmp_path / "o"
    run(tiny_config(out, always_save_checkpoint=False, max_iters=10, eval_interval=5))
    best_hash = hashlib.sha256((out / "best.pt").read_bytes()).hexdigest()
    trainer = Trainer(tiny_config(out, init_from="resume", always_save_checkpoint=False, max_iters=30,
                                  eval_interval=5), log=lambda *_: None)
    with torch.no_grad():
        trainer.raw_model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="became nan at iteration 11"):
        trainer.train()
    assert hashlib.sha256((out / "best.pt").read_bytes()).hexdigest() == best_hash


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=1100)
    assert get_lr(0, cfg) == pytest.approx(1e-3 * 1 / 101)  # never 0 at it=0
    assert get_lr(50, cfg) == pytest.approx(1e-3 * 51 / 101)
    assert get_lr(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert get_lr(100, cfg) == pytest.approx(1e-3)  # warmup end: the peak
    assert get_lr(600, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half way: cos(pi/2) = 0
    assert get_lr(350, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4)
    assert get_lr(1100, cfg) == pytest.approx(1e-4)
    assert get_lr(5000, cfg) == pytest.approx(1e-4)
    cfg.decay_lr = False
    assert get_lr(0, cfg) == get_lr(5000, cfg) == 1e-3


def test_triton_backend_trains_like_naive(char_dataset, tmp_path):
    """30 steps with the Triton kernels (interpreted) end within 1% of naive's loss, same seed."""
    final = {}
    for attn in ("naive", "triton"):
        # one layer, batch 4, 30 steps (80 s at 50: the interpreter runs each Triton program in Python)
        _, result = run(tiny_config(tmp_path / attn, attn=attn, eval_interval=1000, n_layer=1, batch_size=4,
                                    max_iters=30, lr_decay_iters=30))
        final[attn] = sum(loss for _, loss in result["history"][-10:]) / 10
    assert abs(final["triton"] - final["naive"]) <= 0.01 * final["naive"]


def test_missing_dataset_is_prepared_automatically(data_dir, tmp_path, monkeypatch):
    import nanogpt.data
    monkeypatch.setattr(nanogpt.data, "shakespeare_text", lambda source=None: "To be, or not to be.\n" * 200)
    logs = []
    run(tiny_config(tmp_path / "o", dataset="shakespeare_char", max_iters=2, eval_interval=100), logs)
    assert any("dataset shakespeare_char not found" in line and "preparing it now" in line for line in logs)
    assert (data_dir / "shakespeare_char" / "meta.pkl").exists()


def test_missing_dataset_error_names_the_command(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--dataset=openwebtext", "--device=cpu", "--n_layer=1",
                        "--n_head=1", "--n_embd=16", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "NANOGPT_DATA": str(data_dir)})
    assert r.returncode == 2
    assert "error:" in r.stderr and "prepare the dataset first (python -m nanogpt.data openwebtext)" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_and_exits_cleanly(char_dataset, tmp_path, sig):
    out = tmp_path / "o"
    args = [sys.executable, "-u", "train.py", "--dataset=tiny_char", "--device=cpu", "--n_layer=2", "--n_head=2",
            "--n_embd=32", "--block_size=16", "--batch_size=8", "--gradient_accumulation_steps=1",
            "--max_iters=100000", "--eval_interval=100000", "--eval_iters=2", "--log_interval=1", f"--out_dir={out}"]
    env = {**os.environ, "NANOGPT_DATA": str(char_dataset.parent)}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 20:"):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + rest
    assert f"received {sig.name}: stopped after iteration" in rest
    assert f"Resume with: python train.py ... --out_dir={out} --init_from=resume" in rest
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] >= 21


def test_wandb_offline_logging(char_dataset, tmp_path):
    pytest.importorskip("wandb")
    r = subprocess.run([sys.executable, "train.py", "--dataset=tiny_char", "--device=cpu", "--n_layer=1", "--n_head=2",
                        "--n_embd=32", "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=1",
                        "--max_iters=6", "--eval_interval=5", "--eval_iters=1", "--wandb_log=True",
                        f"--out_dir={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NANOGPT_DATA": str(char_dataset.parent), "WANDB_MODE": "offline",
                            "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "false"})
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    summary = r.stdout + r.stderr
    for key in ("iter", "lr", "tokens_per_sec", "train/loss", "val/loss", "train/loss_step"):
        assert f" {key} " in summary, key


TINY_ARGS = ["--dataset=tiny_char", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
             "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=1"]


def test_two_runs_never_share_an_out_dir_and_a_killed_run_blocks_nothing(char_dataset, tmp_path):
    """A second train.py on an out_dir in use stops before any work, naming the first; once the first is
    killed (SIGKILL: no cleanup), the next run starts."""
    out = tmp_path / "o"
    env = {**os.environ, "NANOGPT_DATA": str(char_dataset.parent)}
    first = subprocess.Popen([sys.executable, "-u", "train.py", *TINY_ARGS, "--max_iters=100000",
                              "--eval_interval=100000", f"--out_dir={out}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("iter 1:"):
                break
        second = run_command("train.py", *TINY_ARGS, "--max_iters=2", f"--out_dir={out}", env=env)
        assert second.returncode == 2, second.stderr
        assert second.stderr == (f"error: out_dir {out} is in use by another training run (pid {first.pid}, lock "
                                 f"{out / 'train.lock'}): wait for it to end, stop it, or choose another --out_dir\n")
        assert "initializing" not in second.stdout  # stopped before any work
    finally:
        first.kill()
        first.communicate()
    third = run_command("train.py", *TINY_ARGS, "--max_iters=2", "--eval_interval=100", f"--out_dir={out}", env=env)
    assert third.returncode == 0, third.stderr
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 3


def test_a_failed_checkpoint_write_keeps_the_previous_one(char_dataset, tmp_path, monkeypatch):
    """The disk fills between two checkpoints: training stops with one line naming the file, ckpt.pt is the
    previous one, no temporary file is left."""
    out = tmp_path / "o"
    real_save, calls = torch.save, []

    def disk_full_on_the_second_write(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_the_second_write)
    with pytest.raises(CheckpointError) as e:
        run(tiny_config(out, max_iters=20, eval_interval=5))
    assert str(e.value) == (f"could not write checkpoint {out / 'ckpt.pt'}: No space left on device; the previous "
                            f"ckpt.pt is intact (free space or fix the permissions of {out}, then resume with "
                            f"--init_from=resume)")
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "train.lock"]


def test_a_write_refused_by_the_os_is_one_line_from_train_py(char_dataset, tmp_path):
    """A real failure: the OS file-size limit (EFBIG) is below the checkpoint's size."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    out = tmp_path / "o"
    r = run_command("train.py", *TINY_ARGS, "--max_iters=3", "--eval_interval=2", f"--out_dir={out}",
                    env={"NANOGPT_DATA": str(char_dataset.parent)}, preexec_fn=limit_file_size)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"error: could not write checkpoint {out / 'ckpt.pt'}: File too large; no earlier ckpt.pt "
                        f"existed (free space or fix the permissions of {out}, then resume with --init_from=resume)\n")
    assert sorted(p.name for p in out.iterdir()) == ["train.lock"]


def test_under_ddp_only_log_steps_synchronize(char_dataset, tmp_path, monkeypatch):
    """The stop flag rides on the all-reduce that averages the logged loss: between log steps no collective and no
    .item() runs, and a signal seen by one rank stops every rank at the next log step."""
    import torch.distributed as dist
    trainer = Trainer(tiny_config(tmp_path / "o", log_interval=10), log=lambda *_: None)
    try:
        reduced = []
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: reduced.append(t.clone()))
        monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail(".item() outside a log step"))
        trainer.ddp, trainer._local_iter_num, trainer._running_mfu = True, 1, -1.0
        loss_sum = torch.tensor(2.5)
        trainer.iter_num = 6  # iteration 5: not a log step
        assert trainer._log_step(loss_sum, 0.1, 1e-3, stop_flag=True) is False
        assert reduced == []
        trainer.iter_num = 11  # iteration 10: a log step; one all-reduce of (loss, stop flag)
        assert trainer._log_step(loss_sum, 0.1, 1e-3, stop_flag=True) is True
        assert len(reduced) == 1 and reduced[0].tolist() == [2.5, 1.0]
        assert trainer.history[-1] == (10, 2.5)
    finally:
        trainer.ddp = False  # no process group to destroy
        trainer.close()
