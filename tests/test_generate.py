"""nanogpt/generate.py: the KV cache gives the tokens of plain generation; temperature, top-k, top-p; seeds."""
import pytest
import torch

from nanogpt.generate import generate, sample_next
from nanogpt.model import GPT, GPTConfig


def tiny_model(attn="sdpa", block_size=24):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=41, n_layer=2, n_head=2, n_embd=32, attn=attn)).eval()


@pytest.mark.parametrize("attn", ["naive", "sdpa", "triton"])
@pytest.mark.parametrize("prompt_len", [1, 21])  # 21 = block_size - 3
def test_kv_cache_gives_the_tokens_of_plain_generation(attn, prompt_len):
    """Greedy decoding; 10 new tokens from a 21-token prompt cross block_size=24, so the window slides."""
    model = tiny_model(attn)
    idx = torch.randint(0, 41, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    with_cache = generate(model, idx, 10, top_k=1, use_cache=True)
    without = generate(model, idx, 10, top_k=1, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (2, prompt_len + 10)


def test_kv_cache_logits_match_full_forward():
    from nanogpt.generate import KVCache
    model = tiny_model()
    idx = torch.randint(0, 41, (1, 12))
    cache = KVCache(model.config.n_layer, model.config.block_size)
    model(idx[:, :5], kv_cache=cache)
    for t in range(5, 12):
        step_logits, _ = model(idx[:, t:t + 1], kv_cache=cache)
        full_logits, _ = model(idx[:, :t + 1])
        torch.testing.assert_close(step_logits, full_logits, rtol=1e-5, atol=1e-5)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, top_k=1, generator=g).item() for _ in range(20)} == {3}
    assert {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)} == {2, 3}
    # probabilities ~ [0.03, 0.09, 0.24, 0.64]: top_p=0.7 keeps tokens 3 and 2
    assert {sample_next(logits, top_p=0.7, generator=g).item() for _ in range(200)} == {2, 3}
    assert {sample_next(logits, top_p=0.5, generator=g).item() for _ in range(50)} == {3}
    with pytest.raises(ValueError, match="temperature=0 must be > 0"):
        sample_next(logits, temperature=0)


def test_seeded_generation_is_reproducible():
    model = tiny_model()
    idx = torch.zeros(3, 1, dtype=torch.long)
    a = generate(model, idx, 15, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 15, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # one batch, different samples
