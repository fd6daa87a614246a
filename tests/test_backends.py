"""nanogpt/backends.py: every kernel backend gives the reference's results; the registry and its errors; what a
backend needs to run (check_device), seen from the command lines."""
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from helpers import ROOT
from helpers import TINY_MODEL as TINY
from helpers import tiny_model_pair as make_pair
from kernels.testing import relative_error, tolerance
from nanogpt.backends import REFERENCE, Backend, available_backends, get_backend, register_backend, unregister_backend
from nanogpt.errors import ConfigError
from nanogpt.model import GPT, GPTConfig

OTHERS = [b for b in available_backends() if b != REFERENCE]
TRITON_BACKENDS = [b for b in available_backends() if get_backend(b).runs_triton]


def forward_backward(model, idx, targets):
    model.zero_grad()
    logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fused_loss_head", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("bias", [True, False])
def test_backends_match_naive(other, bias, fused_loss_head):
    """Every backend gives naive's logits, loss and parameter gradients (fp32, dropout 0), relative L2 error; a
    fused loss head returns no logits, and fused_loss_head=False gives them back (nanoGPT's signature)."""
    tol = tolerance(torch.float32)
    naive, model = make_pair(REFERENCE, other, bias=bias, fused_loss_head=fused_loss_head)
    idx = torch.randint(0, TINY["vocab_size"], (2, 17))
    targets = torch.randint(0, TINY["vocab_size"], (2, 17))
    ln, lossn, gn = forward_backward(naive, idx, targets)
    lo, losso, go = forward_backward(model, idx, targets)
    if fused_loss_head and get_backend(other).loss_head is not None:
        assert lo is None  # the fused loss head never builds the logits
    else:
        assert lo.shape == (2, 17, TINY["vocab_size"]) and relative_error(lo, ln) <= tol
    assert abs(losso.item() - lossn.item()) <= tol * abs(lossn.item())
    assert gn.keys() == go.keys()
    for name in gn:
        assert relative_error(go[name], gn[name]) <= tol, name


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="unknown kernel backend attn='flash9': choose one of "
                                         + ", ".join(available_backends())):
        GPTConfig(attn="flash9")
    assert available_backends()[:3] == ["naive", "sdpa", "triton"]


def test_registering_a_backend_is_one_entry():
    naive = get_backend(REFERENCE)
    register_backend("mine", lambda: Backend("mine", naive.attention, naive.layer_norm, naive.gelu))
    try:
        a, b = make_pair(REFERENCE, "mine")
        assert b.backend is get_backend("mine")
        idx = torch.randint(0, 97, (1, 8))
        assert torch.equal(a(idx)[0], b(idx)[0])
    finally:
        unregister_backend("mine")


@pytest.mark.parametrize("attn", available_backends())
def test_tanh_gelu_config(attn):
    torch.manual_seed(0)
    naive, model = make_pair(REFERENCE, attn, gelu="tanh")
    idx = torch.randint(0, 97, (1, 8))
    assert relative_error(model(idx)[0], naive(idx)[0]) < tolerance(torch.float32)


@pytest.mark.parametrize("attn", available_backends())
def test_check_device(attn, monkeypatch):
    """Every backend runs on the CPU here (the tests interpret Triton); one that runs Triton refuses the CPU without
    the interpreter and any device but CUDA, in one line that names the fix."""
    backend = get_backend(attn)
    backend.check_device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not backend.runs_triton:
        backend.check_device("cpu")
        backend.check_device("mps")
        return
    with pytest.raises(ConfigError, match=f"attn={attn} on the CPU runs only through Triton's interpreter: set "
                                          f"TRITON_INTERPRET=1"):
        backend.check_device("cpu")
    with pytest.raises(ConfigError, match="need a CUDA GPU"):
        backend.check_device("mps")
    backend.check_device("cuda:0")


def _without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return dict(env, NANOGPT_DATA=env.get("NANOGPT_DATA", str(ROOT / "no-data")))


@pytest.mark.skipif(torch.cuda.is_available() or not TRITON_BACKENDS, reason="a CPU-only check")
@pytest.mark.parametrize("command", ["sample.py", "bench", "train.py"])
def test_commands_refuse_triton_on_cpu_without_the_interpreter(command, tmp_path):
    """sample.py, python -m bench and train.py, in a process WITHOUT TRITON_INTERPRET (the conftest sets it for
    the tests' own subprocesses): one `error:` line and exit code 2, no traceback, before any work."""
    attn = TRITON_BACKENDS[0]
    if command == "sample.py":  # a checkpoint of a tiny sdpa model, sampled with a Triton backend
        cfg = GPTConfig(**dict(TINY, attn="sdpa"))
        torch.save({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg)}, tmp_path / "ckpt.pt")
        args = ["sample.py", f"--out_dir={tmp_path}", "--device=cpu", f"--attn={attn}", "--max_new_tokens=2"]
    elif command == "bench":
        args = ["-m", "bench", "--device=cpu", f"--attn={attn}", "--n_layer=1", "--n_head=2", "--n_embd=32",
                "--block_size=16", "--batch_size=2", "--vocab_size=64", "--num_steps=1"]
    else:
        args = ["train.py", "--device=cpu", f"--attn={attn}", "--dataset=shakespeare_char", f"--out_dir={tmp_path}",
                "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16"]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_without_interpreter())
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: attn={attn} on the CPU runs only through Triton's interpreter: set TRITON_INTERPRET=1 (slow, for "
        f"testing), or use a CUDA GPU or --attn=sdpa"], r.stderr
