"""Generation through the model's KV cache: prefill + decode steps against the uncached forward, every
backend's decode attention against the reference's, the two context modes past block_size, the compiled step; temperature, top-k, top-p; seeds."""
import pytest
import torch

from nanogpt.backends import REFERENCE, available_backends
from nanogpt.generate import generate, model_steps, sample_next
from nanogpt.model import GPT, GPTConfig

BACKENDS = available_backends()


def tiny_model(attn="sdpa", block_size=24, n_layer=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=41, n_layer=n_layer, n_head=2, n_embd=32,
                         attn=attn)).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, 41, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("attn", BACKENDS)
def test_ragged_prefill_and_decode_match_the_full_forward(attn):
    """Rows of different lengths in one batch (right-padded prompts), then steps of 1 and of 3 new tokens: every
    row's logits equal the uncached forward over that row's own tokens."""
    model = tiny_model(attn)
    B, prompt_lengths = 3, [2, 9, 5]
    seq = tokens(B, 20)
    lengths = torch.tensor(prompt_lengths, dtype=torch.int32)
    model.setup_kv_cache(B)
    logits = model.prefill(seq[:, :max(prompt_lengths)], lengths)
    for b, n in enumerate(prompt_lengths):
        torch.testing.assert_close(logits[b], model(seq[b:b + 1, :n])[0][0], rtol=1e-5, atol=1e-5)
    done = list(prompt_lengths)
    for step in (1, 3, 1, 2):
        new = torch.stack([seq[b, done[b]:done[b] + step] for b in range(B)])
        logits = model.decode(new)
        assert logits.shape == (B, step, 41)
        for b in range(B):
            done[b] += step
            for i in range(step):  # each new token's logits: the forward over the row up to that token
                full = model(seq[b:b + 1, :done[b] - step + i + 1])[0][0, -1]
                torch.testing.assert_close(logits[b, i], full, rtol=1e-5, atol=1e-5)
    assert model.kv_cache.lengths.tolist() == done


@pytest.mark.parametrize("prompt_len", [1, 10])  # block_size 12: 10 + 6 new tokens cross it
def test_backends_decode_the_same_tokens(prompt_len):
    """Every backend gives the reference's greedy tokens, in both context modes (shift: 20 tokens, 2 shifts)."""
    idx = tokens(2, prompt_len)
    for context, n in (("slide", 6), ("shift", 20)):
        results = {attn: generate(tiny_model(attn, block_size=12, n_layer=1), idx, n, top_k=1, context=context)
                   for attn in BACKENDS}
        for attn in BACKENDS:
            assert torch.equal(results[attn], results[REFERENCE]), (attn, context)


@pytest.mark.parametrize("attn", BACKENDS)
def test_slide_gives_the_uncached_tokens(attn):
    """Greedy: 10-token prompt, 6 new tokens past block_size 12; the default mode is slide."""
    model = tiny_model(attn, block_size=12)
    idx = tokens(2, 10)
    with_cache = generate(model, idx, 6, top_k=1)
    assert torch.equal(with_cache, generate(model, idx, 6, top_k=1, use_cache=False))
    assert with_cache.shape == (2, 16)


def test_slide_gives_the_uncached_tokens_when_sampling():
    """Sampled (temperature 1, one seed): 60 tokens from a 1-token prompt, two and a half windows."""
    model = tiny_model("sdpa", block_size=24)
    idx = tokens(3, 1)
    a = generate(model, idx, 60, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 60, use_cache=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def shift_reference(model, idx, max_new_tokens):
    """What context=shift promises, with the uncached forward: a window that grows from where the last shift
    started it; when it would pass block_size, it restarts from the last block_size // 2 tokens."""
    block = model.config.block_size
    start = max(0, idx.size(1) - block)
    for _ in range(max_new_tokens):
        if idx.size(1) - start > block:
            start = idx.size(1) - block // 2
        logits, _ = model(idx[:, start:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("prompt_len", [1, 24, 30])  # 30 > block_size: cropped to the last 24
def test_shift_keeps_the_last_half_and_decodes_from_the_cache(prompt_len):
    model = tiny_model("sdpa")
    idx = tokens(2, prompt_len)
    stats = {}
    out = generate(model, idx, 50, top_k=1, context="shift", stats=stats)
    assert torch.equal(out, shift_reference(model, idx, 50))
    # one re-run (12 tokens) per 12 new tokens once the window is full; every other step is a one-token decode
    assert stats["calls"] == 50 and stats["decode_steps"] + stats["prefill_tokens"] // 12 >= 49 - 1
    assert stats["prefill_tokens"] <= min(prompt_len, 24) + 12 * 5


def test_compiled_decode_step_gives_the_eager_tokens():
    """torch.compile (inductor, static shapes) of the one-token decode step and of the prefill, on the CPU."""
    model = tiny_model("sdpa", n_layer=1)
    idx = tokens(2, 12)  # block_size // 2: the prompt and the shift's re-run have one shape
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of graphs compiled by earlier tests
    eager = generate(model, idx, 30, top_k=1, context="shift")
    compiled = generate(model, idx, 30, top_k=1, context="shift", compile=True)
    assert torch.equal(eager, compiled)
    prefill, decode, _ = model_steps(model, compile=True)
    assert model_steps(model, compile=True)[1] is decode  # compiled once per model
    # the decode step compiled once, whatever the cache lengths: static shapes, lengths live on the device
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


def test_cache_belongs_to_the_model_and_not_to_its_checkpoint():
    model = tiny_model()
    cache = model.setup_kv_cache(3)
    assert cache.layers[0].k.shape == (3, 2, 24, 16) and cache.lengths.dtype == torch.int32
    assert not any("kv_cache" in k for k in model.state_dict())
    generate(model, tokens(3, 4), 5)
    assert model.setup_kv_cache(3) is cache and cache.lengths.tolist() == [0, 0, 0]  # reused, emptied
    assert model.setup_kv_cache(2) is not cache
    with pytest.raises(ValueError, match=r"decode of a batch of 5 needs model.setup_kv_cache\(5\) first"):
        model.decode(tokens(5, 1))
    with pytest.raises(ValueError, match="context='wrap': choose one of slide, shift"):
        generate(model, tokens(1, 1), 2, context="wrap")


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
