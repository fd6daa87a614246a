"""nanogpt/model.py: the GPT's shape checks, weights, parameter count, cropping, optimizer groups."""
from dataclasses import asdict, fields

import pytest
import torch

from helpers import TINY_MODEL as TINY
from nanogpt.backends import get_backend
from nanogpt.config import TrainConfig
from nanogpt.model import GPT, GPTConfig, model_args


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_fused_residual_blocks_compute_the_textbook_composition(attn):
    """The Block hands each residual add to the LayerNorm after it (add_layer_norm, carried across blocks); for
    naive and sdpa that is `x + r` then their layer_norm, so the logits are bit for bit those of
    x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) ... ln_f(x)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, attn=attn))
    idx = torch.randint(0, TINY["vocab_size"], (2, 11))
    t = model.transformer
    x = t.drop(t.wte(idx) + t.wpe(torch.arange(11)))
    for block in t.h:
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp(block.ln_2(x))
    expected = model.lm_head(t.ln_f(x)[:, [-1], :])
    assert torch.equal(model(idx)[0], expected)


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


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)


def test_model_args_come_from_gptconfig():
    """The model keys of a training/bench config are GPTConfig's own fields (no hand-written list): a key added to
    GPTConfig and to TrainConfig reaches the model, and the checkpoint's model_args hold every field."""
    args = model_args(TrainConfig(n_layer=3, n_head=2, n_embd=32, attn="naive", fused_loss_head=False), vocab_size=50)
    assert set(args) <= {f.name for f in fields(GPTConfig)}
    assert args["n_layer"] == 3 and args["vocab_size"] == 50 and args["fused_loss_head"] is False
    model = GPT(GPTConfig(**args))
    assert model.backend is get_backend("naive") and set(asdict(model.config)) == {f.name for f in fields(GPTConfig)}
