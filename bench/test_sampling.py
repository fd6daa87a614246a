"""Sampling: tokens/s of generate() with the KV cache (and without, for comparison)."""
import pytest
import torch

from bench.common import DEVICE, ON_GPU, measure
from nanogpt.generate import generate
from nanogpt.model import GPT, GPTConfig

if ON_GPU:
    MODEL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    NEW_TOKENS, BATCH = 200, 1
else:
    MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=512)
    NEW_TOKENS, BATCH = 64, 1


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_generate(benchmark, record, use_cache):
    benchmark.group = "sampling"
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL, attn="sdpa")).to(DEVICE).eval()
    if ON_GPU:
        model = model.to(torch.bfloat16)
    prompt = torch.zeros(BATCH, 1, dtype=torch.long, device=DEVICE)
    # gate: greedy tokens with the cache equal those without it
    a = generate(model, prompt, 16, top_k=1, use_cache=use_cache)
    b = generate(model, prompt, 16, top_k=1, use_cache=not use_cache)
    if not torch.equal(a, b):
        pytest.fail("KV-cache generation differs from plain generation: refusing to time it")
    record(kind="sampling", backend="sdpa", use_cache=use_cache, new_tokens=NEW_TOKENS, batch_size=BATCH,
           model=MODEL, dtype="bfloat16" if ON_GPU else "float32", timed=True)
    seconds = measure(benchmark, lambda p: generate(model, p, NEW_TOKENS, top_k=1, use_cache=use_cache), [(prompt,)],
                      warmup=1, target_round_s=0.0, rounds=5 if ON_GPU else 3)
    if seconds is not None:
        tokens_per_s = NEW_TOKENS * BATCH / seconds
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        benchmark.extra_info.update({"median_s": seconds, "tokens_per_s": tokens_per_s,
                                     "weights_gbps": weight_bytes * NEW_TOKENS / seconds / 1e9})
