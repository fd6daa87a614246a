"""Test setup and fixtures: Triton through its CPU interpreter when there is no GPU (set before anything imports
triton), the repo on sys.path, datasets written to a temporary folder instead of data/.

Shared functions and constants live in helpers.py; tests import them from there, never from this file."""
import os
import sys
from pathlib import Path

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402

from helpers import SAMPLE_TEXT, run, tiny_config  # noqa: E402

# at most 2 threads, and the cores shared among pytest-xdist's workers (oversubscribed threads wait on each other)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """NANOGPT_DATA pointed at an empty temporary folder."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("NANOGPT_DATA", str(root))
    return root


@pytest.fixture
def char_dataset(data_dir):
    """A small character-level dataset at $NANOGPT_DATA/tiny_char."""
    from nanogpt.data import prepare_char
    prepare_char(SAMPLE_TEXT, data_dir / "tiny_char")
    return data_dir / "tiny_char"


@pytest.fixture
def trained(char_dataset, tmp_path):
    """out_dir of a tiny model trained 30 iterations on tiny_char."""
    out = tmp_path / "out"
    run(tiny_config(out, max_iters=30, eval_interval=1000))
    return out
