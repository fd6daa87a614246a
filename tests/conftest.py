"""Test setup: Triton through its CPU interpreter when there is no GPU (set before anything imports triton), the repo on sys.path,
and datasets written to a temporary folder instead of data/."""
import os
import sys
from pathlib import Path

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kernels.testing import relative_error  # noqa: E402,F401  (tests import it from here)

# kernels run on the GPU where there is one, else on the CPU through Triton's interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """NANOGPT_DATA pointed at an empty temporary folder."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("NANOGPT_DATA", str(root))
    return root


SAMPLE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n") * 40


@pytest.fixture
def char_dataset(data_dir):
    """A small character-level dataset at $NANOGPT_DATA/tiny_char."""
    from nanogpt.data import prepare_char
    prepare_char(SAMPLE_TEXT, data_dir / "tiny_char")
    return data_dir / "tiny_char"


def write_tokens(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(ids, dtype=np.uint16).tofile(path)
