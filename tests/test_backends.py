"""nanogpt/backends.py: every kernel backend gives the reference's results; the registry and its errors."""
import pytest
import torch

from kernels.testing import relative_error
from nanogpt.backends import Backend, available_backends, get_backend, register_backend, unregister_backend
from nanogpt.model import GPTConfig
from helpers import tiny_model_pair as make_pair
from helpers import TINY_MODEL as TINY


def forward_backward(model, idx, targets):
    model.zero_grad()
    logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("other,tol", [("sdpa", 1e-5), ("triton", 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_backends_match_naive(other, tol, bias):
    """Every backend gives naive's logits, loss and parameter gradients (fp32, dropout 0), relative L2 error."""
    naive, model = make_pair("naive", other, bias=bias)
    idx = torch.randint(0, TINY["vocab_size"], (2, 17))
    targets = torch.randint(0, TINY["vocab_size"], (2, 17))
    ln, lossn, gn = forward_backward(naive, idx, targets)
    lo, losso, go = forward_backward(model, idx, targets)
    if other == "triton":
        assert lo is None  # its fused loss head never builds the logits
    else:
        assert relative_error(lo, ln) <= tol
    assert abs(losso.item() - lossn.item()) <= tol * abs(lossn.item())
    assert gn.keys() == go.keys()
    for name in gn:
        assert relative_error(go[name], gn[name]) <= tol, name


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="unknown kernel backend attn='flash9': choose one of naive, sdpa, triton"):
        GPTConfig(attn="flash9")
    assert available_backends()[:3] == ["naive", "sdpa", "triton"]


def test_registering_a_backend_is_one_entry():
    naive = get_backend("naive")
    register_backend("mine", lambda: Backend("mine", naive.attention, naive.layer_norm, naive.gelu))
    try:
        a, b = make_pair("naive", "mine")
        idx = torch.randint(0, 97, (1, 8))
        assert torch.equal(a(idx)[0], b(idx)[0])
    finally:
        unregister_backend("mine")


@pytest.mark.parametrize("attn", ["naive", "sdpa", "triton"])
def test_tanh_gelu_config(attn):
    torch.manual_seed(0)
    naive, model = make_pair("naive", attn, gelu="tanh")
    idx = torch.randint(0, 97, (1, 8))
    assert relative_error(model(idx)[0], naive(idx)[0]) < 1e-5
