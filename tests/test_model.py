import pytest
import torch

from conftest import relative_error
from nanogpt.backends import available_backends, get_backend
from nanogpt.model import GPT, GPTConfig

TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def make_pair(attn_a, attn_b, **overrides):
    cfg = dict(TINY, **overrides)
    torch.manual_seed(0)
    a = GPT(GPTConfig(**cfg, attn=attn_a))
    b = GPT(GPTConfig(**cfg, attn=attn_b))
    b.load_state_dict(a.state_dict())
    return a, b


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


def test_forward_without_targets_returns_last_position_only():
    model = GPT(GPTConfig(**TINY))
    logits, loss = model(torch.randint(0, 97, (3, 10)))
    assert logits.shape == (3, 1, 97) and loss is None


def test_weight_tying_and_init():
    model = GPT(GPTConfig(**TINY))
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * TINY["n_layer"]) ** 0.5) < 0.003


def test_num_params_excludes_position_embeddings():
    model = GPT(GPTConfig(**TINY))
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params() == total - TINY["block_size"] * TINY["n_embd"]
    assert model.get_num_params(non_embedding=False) == total


def test_crop_block_size():
    model = GPT(GPTConfig(**TINY))
    model.crop_block_size(16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 64)
    model(torch.randint(0, 97, (1, 16)))
    with pytest.raises(ValueError, match="cannot forward a sequence of length 17: block_size is only 16"):
        model(torch.randint(0, 97, (1, 17)))
    with pytest.raises(ValueError, match="larger than the model's 16"):
        model.crop_block_size(32)


def test_configure_optimizers_decays_only_matrices():
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert nodecay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in nodecay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_estimate_mfu_uses_flop_formula_and_never_guesses_a_peak():
    model = GPT(GPTConfig(**TINY))
    N = model.get_num_params()
    L, H, Q, T = 2, 4, 16, 32
    flops_per_iter = (6 * N + 12 * L * H * Q * T) * T * 8
    assert model.estimate_mfu(8, 0.5, peak_flops=1e12) == pytest.approx(flops_per_iter / 0.5 / 1e12)
    assert model.estimate_mfu(8, 0.5) is None  # CPU: no known peak, so no number


def test_gpu_peak_table():
    from nanogpt.hardware import gpu_peak_flops
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert gpu_peak_flops("Some Future GPU") is None


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="unknown attention backend 'flash9': choose one of naive, sdpa, triton"):
        GPTConfig(attn="flash9")
    assert available_backends()[:3] == ["naive", "sdpa", "triton"]


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)


def test_registering_a_backend_is_one_entry():
    from nanogpt.backends import Backend, register_backend, _REGISTRY
    naive = get_backend("naive")
    register_backend("mine", lambda: Backend("mine", naive.attention, naive.layer_norm, naive.gelu))
    try:
        a, b = make_pair("naive", "mine")
        idx = torch.randint(0, 97, (1, 8))
        assert torch.equal(a(idx)[0], b(idx)[0])
    finally:
        _REGISTRY.pop("mine")


@pytest.mark.parametrize("attn", ["naive", "sdpa", "triton"])
def test_tanh_gelu_config(attn):
    torch.manual_seed(0)
    naive, model = make_pair("naive", attn, gelu="tanh")
    idx = torch.randint(0, 97, (1, 8))
    assert relative_error(model(idx)[0], naive(idx)[0]) < 1e-5
