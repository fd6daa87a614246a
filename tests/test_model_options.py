"""The model options of today's GPTs (GPTConfig n_kv_head, attn_window, attn_softcap, logit_softcap): off by
default (GPT-2's shapes and math), and each one the same on every backend, in training, prefill and decode."""
import math
from dataclasses import asdict

import pytest
import torch

from helpers import TINY_MODEL as TINY
from helpers import attention_reference, tiny_model_pair
from kernels.testing import relative_error, tolerance
from nanogpt.backends import REFERENCE, available_backends, get_backend
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.loading import model_from_checkpoint
from nanogpt.model import GPT, GPTConfig

OTHERS = [b for b in available_backends() if b != REFERENCE]
OPTIONS = {
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "window": dict(attn_window=5),
    "attn_softcap": dict(attn_softcap=2.0),
    "logit_softcap": dict(logit_softcap=3.0),
    "rms": dict(norm="rms"),
    "rope": dict(rope=True),
    "all": dict(n_kv_head=2, attn_window=7, attn_softcap=5.0, logit_softcap=10.0, norm="rms", rope=True),
}


def test_off_by_default_keeps_gpt2():
    """The defaults build GPT-2's layers: a fused q, k, v projection of 3 * n_embd, one kv head per head."""
    config = GPTConfig(**TINY)
    assert (config.kv_heads, config.attention_options()) == (4, {"softcap": None, "window": None})
    model = GPT(config)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 64, 64)
    gqa = GPT(GPTConfig(**TINY, n_kv_head=2))
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (64 + 2 * 2 * 16, 64)
    assert "wpe" in model.transformer and "wpe" not in GPT(GPTConfig(**TINY, rope=True)).transformer
    assert model.transformer.ln_f.bias is not None and not hasattr(GPT(GPTConfig(**TINY, norm="rms")).transformer.ln_f,
                                                                    "bias")


@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_backends_agree_with_options(name, other):
    """Each option, and all together: logits, loss and every gradient of each backend equal naive's."""
    tol = tolerance(torch.float32)
    naive, model = tiny_model_pair(REFERENCE, other, fused_loss_head=True, **OPTIONS[name])
    idx = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(2))
    results = []
    for m in (naive, model):
        m.zero_grad()
        _, loss = m(idx, targets)
        loss.backward()
        results.append((loss, m(idx)[0], {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss_n, last_n, grads_n), (loss_o, last_o, grads_o) = results
    assert abs(loss_o.item() - loss_n.item()) <= tol * abs(loss_n.item())
    assert relative_error(last_o, last_n) <= tol
    for key in grads_n:
        assert relative_error(grads_o[key], grads_n[key]) <= tol, key


# caps small enough to matter at initialization, where the scores are ~0.01 and the logits ~0.1
CHANGING = dict(OPTIONS, attn_softcap=dict(attn_softcap=0.002), logit_softcap=dict(logit_softcap=0.05))


@pytest.mark.parametrize("attn", available_backends())
@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_changes_the_model(name, attn):
    """An option that is on changes the loss: none is silently dropped on the way to the kernels."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**TINY, attn=attn))
    model = GPT(GPTConfig(**TINY, attn=attn, **CHANGING[name]))
    state = {k: v for k, v in plain.state_dict().items() if k in model.state_dict()}  # RMSNorm: no bias
    for key, value in model.state_dict().items():  # GQA: the plain model's first kv heads
        if value.shape != state[key].shape:
            q, kv = 64, (value.shape[0] - 64) // 2
            state[key] = torch.cat([state[key][:q + kv], state[key][2 * q:2 * q + kv]])
    model.load_state_dict(state)
    idx = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert abs(model(idx, idx)[1].item() - plain(idx, idx)[1].item()) > 1e-4


@pytest.mark.parametrize("window", [None, (0, 0), (3, 0)])
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("H_kv", [4, 2, 1])
def test_reference_attention_options(H_kv, softcap, window):
    """The naive backend (every backend's reference in these tests) against the float64 reference the kernels
    are tested with: one definition of GQA, softcap and window across the project."""
    g = torch.Generator().manual_seed(H_kv)
    q = torch.randn(2, 4, 11, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, H_kv, 11, 16, generator=g, dtype=torch.float64) for _ in range(2))
    got = get_backend(REFERENCE).attention(q, k, v, 0.0, softcap=softcap, window=window)
    want = attention_reference(q, k, v, True, 1 / math.sqrt(16), softcap=softcap, window=window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("attn", available_backends())
def test_decode_with_options_matches_the_full_forward(attn):
    """Prefill a ragged batch, then decode steps of 1 and 3 tokens: each token's logits equal the uncached
    forward's, with GQA, a window shorter than the sequences and both softcaps."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, attn=attn, **OPTIONS["all"])).eval()
    seq = torch.randint(0, TINY["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(3))
    prompt_lengths = [2, 9, 5]
    model.setup_kv_cache(3)
    assert model.kv_cache.layers[0].k.shape == (3, 2, TINY["block_size"], 16)
    logits = model.prefill(seq[:, :9], torch.tensor(prompt_lengths, dtype=torch.int32))
    for b, n in enumerate(prompt_lengths):
        torch.testing.assert_close(logits[b], model(seq[b:b + 1, :n])[0][0], rtol=1e-5, atol=1e-5)
    done = list(prompt_lengths)
    for step in (1, 3, 1):
        logits = model.decode(torch.stack([seq[b, done[b]:done[b] + step] for b in range(3)]))
        for b in range(3):
            done[b] += step
            for i in range(step):
                full = model(seq[b:b + 1, :done[b] - step + i + 1])[0][0, -1]
                torch.testing.assert_close(logits[b, i], full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(n_kv_head=-1), "n_kv_head=-1 must divide"),
    (dict(attn_window=-2), "attn_window=-2 must be >= 0"),
    (dict(attn_softcap=-1.0), "attn_softcap=-1.0 must be >= 0"),
    (dict(logit_softcap=-3.0), "logit_softcap=-3.0 must be >= 0"),
    (dict(norm="batch"), "norm='batch': choose 'layer'"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**TINY, **options)


@pytest.mark.parametrize("options", ["none", "all"])
def test_checkpoint_with_options_loads(options):
    """A checkpoint's model_args keep the options (0 is "off" for n_kv_head and attn_window, not a bad value) and
    the loaded model computes what the saved one did; a negative option is still refused."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **({} if options == "none" else OPTIONS["all"]))).eval()
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config)}
    loaded = model_from_checkpoint(ckpt, "ckpt.pt").eval()
    assert loaded.config == model.config
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    ckpt["model_args"]["attn_window"] = -1
    with pytest.raises(CheckpointError, match="attn_window=-1 must be >= 0"):
        model_from_checkpoint(ckpt, "ckpt.pt")
