"""Checkpoint files: written atomically, read without running pickled code. File I/O only: building a model from
a checkpoint is nanogpt/loading.py's job.

A checkpoint is a dict: model, optimizer, scaler, model_args, iter_num, best_val_loss, config, rng
(python, numpy, torch, cuda) and sampler (the batch sampler's generator state): everything a run needs
to continue exactly where it stopped.
"""
import fcntl
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from nanogpt.errors import CheckpointError, OutDirInUse

REQUIRED_KEYS = ("model", "model_args")
LOCK_NAME = "train.lock"


class OutDirLock:
    """One training run per out_dir: an exclusive flock on out_dir/train.lock, held for the run's life and
    released by the OS when the process ends, however it ends (so a killed run never blocks the next one).
    The file holds the holder's PID, so that the refusal can name it."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK_NAME
        self._file = None

    def acquire(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise CheckpointError(f"cannot use out_dir {self.path.parent}: {e.strerror} (choose a folder you can "
                                  f"write with --out_dir)") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise OutDirInUse(f"out_dir {self.path.parent} is in use by another training run (pid {holder}, lock "
                              f"{self.path}): wait for it to end, stop it, or choose another --out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock; the file may stay
            self._file = None


def save_checkpoint(obj, path) -> None:
    """Write obj to path so that a kill at any moment leaves the old file or the new one, never a torn one:
    a temporary file in the same folder, flushed and fsynced, renamed over path, then the folder fsynced.
    A write that fails (disk full, permission denied) removes the temporary file, leaves the previous
    checkpoint as it was, and raises CheckpointError saying what happened and where."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_failed(path, e, kept=path.exists()) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, Exception):  # OSError, or torch's writer failing on it
            raise _write_failed(path, e, kept=path.exists()) from None
        raise  # KeyboardInterrupt, SystemExit: as they are
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # no directory fsync on this platform
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_failed(path: Path, error: Exception, kept: bool) -> CheckpointError:
    cause = error if isinstance(error, OSError) else (error.__cause__ or error.__context__ or error)
    if isinstance(cause, OSError) and cause.strerror:
        what = cause.strerror
    else:
        what = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
    previous = (f"the previous {path.name} is intact" if kept else f"no earlier {path.name} existed")
    return CheckpointError(f"could not write checkpoint {path}: {what}; {previous} (free space or fix the "
                           f"permissions of {path.parent}, then resume with --init_from=resume)")


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load with weights_only=True (no arbitrary code runs), mapped to the CPU first so that a
    checkpoint saved on one device loads on any other."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: train first (python train.py ... --out_dir={path.parent}) "
                              f"or point --out_dir at the folder that holds ckpt.pt")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file (a checkpoint is the file ckpt.pt written by train.py): point "
                              f"--out_dir at the folder that holds it")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            # torch's message goes on to suggest weights_only=False: the very thing that would run the code
            raise CheckpointError(f"{path} is not a readable nanogpt checkpoint: it holds pickled objects other than "
                                  f"tensors and plain data (they may run code "
                                  f"when unpickled), so it was not loaded: use a checkpoint written by train.py, or "
                                  f"re-save this one as a plain state dict where you trust it") from None
        raise _unreadable(path, e) from None
    except Exception as e:  # empty, truncated zip, a file that is not a checkpoint
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a nanogpt checkpoint: it lacks {', '.join(REQUIRED_KEYS)} (use a "
                              f"ckpt.pt written by train.py)")
    _check_fields(ckpt, path)
    return ckpt


def first_line(error: BaseException, limit=200) -> str:
    """`Type: first line of the message` (some exceptions have an empty message)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__


def _unreadable(path, error) -> CheckpointError:
    size = path.stat().st_size if path.exists() else 0
    what = "it is empty" if size == 0 else first_line(error)
    return CheckpointError(f"{path} is not a readable nanogpt checkpoint ({what}): it was not loaded; resume from "
                           f"another copy, or train anew in another --out_dir")


def _check_fields(ckpt, path) -> None:
    """The types a checkpoint's fields must have, checked before anything uses them (a checkpoint may be edited
    or come from elsewhere): one line naming the field instead of a traceback deep inside model building."""
    def bad(field, expected):
        value = ckpt[field]
        return CheckpointError(f"{path}: field {field!r} is {type(value).__name__}, not {expected}: this is not a "
                               f"checkpoint written by train.py (use another copy, or train anew)")
    if not isinstance(ckpt["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise bad("model", "a dict of parameter names to tensors")
    if not isinstance(ckpt["model_args"], dict) or not all(isinstance(k, str) for k in ckpt["model_args"]):
        raise bad("model_args", "a dict of model settings")
    for field, types_, expected in (("optimizer", dict, "a dict"), ("scaler", (dict, type(None)), "a dict"),
                                    ("iter_num", int, "an int"), ("best_val_loss", (int, float), "a number"),
                                    ("config", dict, "a dict"), ("rng", dict, "a dict"),
                                    ("sampler", torch.Tensor, "a tensor")):
        if field in ckpt and (not isinstance(ckpt[field], types_) or isinstance(ckpt[field], bool)):
            raise bad(field, expected)
    if isinstance(ckpt.get("iter_num"), int) and ckpt["iter_num"] < 0:
        raise CheckpointError(f"{path}: iter_num={ckpt['iter_num']} is negative: not a checkpoint written by "
                              f"train.py (use another copy, or train anew)")


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor is free of NaN and Inf: one max-abs reduction per (device, dtype) group
    (torch._foreach_norm, as clip_grad_norm_ uses; a NaN propagates through the max), one host sync per group
    (usually one)."""
    groups = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    return all(bool(torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all())
               for group in groups.values())


def state_tensors(obj):
    """Every tensor inside nested dicts, lists and tuples (a state dict, an optimizer's state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from state_tensors(v)


def clean_state_dict(state_dict: dict) -> dict:
    """Drop the '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes some saved state dicts carry."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------
# random number generator states, stored as tensors and plain lists so weights_only loading accepts them


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
