import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import ROOT
from nanogpt.checkpoint import (
    CheckpointError,
    OutDirLock,
    clean_state_dict,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nanogpt.errors import OutDirInUse

# One process imports torch once and forks a fresh writer per kill (12 interpreters starting torch cost ~25 s of
# the suite). The parent runs no torch op, so the forked writers start with no thread pool to inherit.
WRITERS = """
import os, sys, torch
sys.path.insert(0, {root!r})
from nanogpt.checkpoint import save_checkpoint
writer = None
for _ in sys.stdin:  # one line per writer asked for
    if writer:
        os.waitpid(writer, 0)  # killed by the test before it asks again
    writer = os.fork()
    if writer == 0:
        try:
            i = 0
            while True:
                i += 1
                save_checkpoint({{"model": {{"w": torch.full((4_000_000,), float(i))}}, "model_args": {{}},
                                 "iter_num": i}}, {path!r})
                print(i, flush=True)
        except BaseException as e:  # not a hang: the test reads this line and fails
            print("failed", repr(e), flush=True)
            os._exit(1)
    print("started", writer, flush=True)
if writer:
    os.waitpid(writer, 0)
"""


def _next_line(proc):
    line = proc.stdout.readline()
    assert line and not line.startswith("failed"), f"the writer failed: {line or 'its process ended'}"
    return line


def test_kill_during_writes_never_leaves_a_torn_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 16 MB checkpoint in a loop, at random moments: every time, ckpt.pt
    loads whole (the old or the new one) and no temporary file is mistaken for it."""
    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    kills, corrupt, last_seen = 0, 0, 0
    forker = subprocess.Popen([sys.executable, "-c", WRITERS.format(root=str(ROOT), path=str(path))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(12):
            forker.stdin.write("go\n")
            forker.stdin.flush()
            line = _next_line(forker)
            while not line.startswith("started"):  # the last writer's lines from before its kill
                line = _next_line(forker)
            writer = int(line.split()[1])
            while not _next_line(forker).strip().isdigit():  # at least one complete write
                pass
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(writer, signal.SIGKILL)
            kills += 1
            try:
                ckpt = load_checkpoint(path)
                value = ckpt["model"]["w"]
                assert bool((value == value[0]).all()) and ckpt["iter_num"] == int(value[0].item())
                last_seen = ckpt["iter_num"]
            except Exception:
                corrupt += 1
    finally:
        forker.stdin.close()
        forker.wait(timeout=60)
    assert kills == 12 and corrupt == 0 and last_seen >= 1
    print(f"{kills} kills during checkpoint writes, {corrupt} corrupt checkpoints")


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"model": {}, "model_args": {}, "rng": rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"a": torch.ones(2)}, "model_args": {}}, path)
    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint({"model": {"a": torch.zeros(2)}, "model_args": {}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert str(e.value).startswith(f"could not write checkpoint {path}: OSError: disk full; the previous ckpt.pt is "
                                   f"intact")


def test_clean_state_dict_strips_compile_and_ddp_prefixes():
    sd = {"_orig_mod.a": 1, "module._orig_mod.b": 2, "c": 3}
    assert clean_state_dict(sd) == {"a": 1, "b": 2, "c": 3}


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"model": {}, "model_args": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable nanogpt checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


FULL_DISK = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from nanogpt.checkpoint import save_checkpoint
from nanogpt.errors import CheckpointError
save_checkpoint({{"model": {{"w": torch.ones(10)}}, "model_args": {{}}}}, {path!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # the OS refuses larger files
try:
    save_checkpoint({{"model": {{"w": torch.zeros(1_000_000)}}, "model_args": {{}}}}, {path!r})
except CheckpointError as e:
    print(e)
"""


def test_a_write_the_os_refuses_keeps_the_old_checkpoint(tmp_path):
    """A real failed write (the file size limit: EFBIG, as a full disk gives ENOSPC) in another process."""
    path = tmp_path / "ckpt.pt"
    r = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=str(ROOT), path=str(path))], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"could not write checkpoint {path}: File too large; the previous ckpt.pt is intact")
    assert r.stdout.count("\n") == 1
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from nanogpt.checkpoint import OutDirLock
lock = OutDirLock({out!r}).acquire()  # held while this process lives
print("locked", flush=True)
time.sleep(600)
"""


def test_out_dir_lock_is_held_by_one_process_and_freed_when_it_dies(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutDirInUse) as e:
            OutDirLock(out).acquire()
        assert f"out_dir {out} is in use by another training run (pid {holder.pid}, lock {out / 'train.lock'})" \
            in str(e.value)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the OS drops the lock
        holder.wait()
    lock = OutDirLock(out).acquire()  # the dead holder's lock file is still there, and blocks nothing
    assert (out / "train.lock").read_text().strip() == str(os.getpid())
    lock.release()
