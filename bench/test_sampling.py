"""Sampling: tokens/s of generate() for each backend x KV cache (off, context=slide, context=shift) x compile.

The prompt is half a block and the run a block long, so every row crosses block_size and the context modes
differ. Gate (before any timing): greedy tokens must equal the uncached eager tokens of the same backend where
the mode promises it (no cache, slide), and the reference backend's eager shift tokens for shift (backends and
compile agree).
On a GPU the gate runs a float32 copy of the model (bf16 ties between near-equal logits of a random model could
flip a greedy token without anything being wrong); the timed run is bf16.

Figures: tokens/s, and the bytes read per second (the weights once per model call, plus the valid part of the KV
cache per decode step) as a fraction of the measured copy roofline.
"""
import pytest
import torch

from bench.common import DEVICE, ON_GPU, interpreted, measure, record_untimed
from nanogpt.backends import REFERENCE, available_backends
from nanogpt.generate import bytes_read, generate
from nanogpt.model import GPT, GPTConfig

if ON_GPU:
    MODEL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)  # GPT-2 124M
    BATCH = 1
else:
    MODEL = dict(n_layer=2, n_head=4, n_embd=128, block_size=16, vocab_size=512)  # 16: the rows still cross it
    BATCH = 1
PROMPT = MODEL["block_size"] // 2
NEW_TOKENS = MODEL["block_size"]  # crosses block_size after half of the run
GATE_TOKENS = PROMPT + 16 if ON_GPU else NEW_TOKENS  # past the block, 16 tokens in

MODES = [(False, "slide"), (True, "slide"), (True, "shift")]  # (use_cache, context); context is moot without
_MODELS = {}


def model_for(attn, dtype):
    """One model per (backend, dtype) for the session: its compiled steps are reused across rows."""
    if (attn, dtype) not in _MODELS:
        torch.manual_seed(0)
        _MODELS[attn, dtype] = GPT(GPTConfig(**MODEL, attn=attn)).to(DEVICE, dtype).eval()
    return _MODELS[attn, dtype]


def greedy(model, prompt, n, use_cache, context, compile):
    return generate(model, prompt, n, top_k=1, use_cache=use_cache, context=context, compile=compile)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("use_cache,context", MODES, ids=["no-cache", "slide", "shift"])
@pytest.mark.parametrize("attn", available_backends())
def test_generate(benchmark, record, attn, use_cache, context, compile):
    benchmark.group = "sampling"
    if compile and not ON_GPU and (attn == REFERENCE or interpreted(attn)):
        pytest.skip("CPU: no compiled rows for the reference nor interpreted Triton (each compile takes a minute "
                    "on a small CPU)")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    prompt = torch.randint(0, MODEL["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(DEVICE)

    # gate: greedy tokens of this row against the tokens its mode promises
    gate_model = model_for(attn, torch.float32)
    tokens = greedy(gate_model, prompt, GATE_TOKENS, use_cache, context, compile)
    if context == "shift":
        expected = greedy(model_for(REFERENCE, torch.float32), prompt, GATE_TOKENS, True, "shift", False)
    else:
        expected = greedy(gate_model, prompt, GATE_TOKENS, False, "slide", False)
    if not torch.equal(tokens, expected):
        pytest.fail(f"{attn} use_cache={use_cache} context={context} compile={compile}: the greedy tokens differ "
                    f"from the ones this mode promises: refusing to time it")

    record(kind="sampling", backend=attn, use_cache=use_cache, context=context if use_cache else None,
           compile=compile, new_tokens=NEW_TOKENS, prompt_tokens=PROMPT, batch_size=BATCH, model=MODEL,
           dtype=str(dtype).replace("torch.", ""), timed=not interpreted(attn))
    if interpreted(attn):
        record_untimed(benchmark, "checked, not timed: Triton runs in its interpreter on the CPU")
        return
    model = model_for(attn, dtype)
    stats = {}
    seconds = measure(benchmark, lambda p: greedy(model, p, NEW_TOKENS, use_cache, context, compile), [(prompt,)],
                      warmup=1, target_round_s=0.0, rounds=5 if ON_GPU else 3)
    if seconds is not None:
        generate(model, prompt, NEW_TOKENS, top_k=1, use_cache=use_cache, context=context, compile=compile,
                 stats=stats)
        gbps = bytes_read(model, stats, BATCH) / seconds / 1e9
        info = {"median_s": seconds, "tokens_per_s": NEW_TOKENS * BATCH / seconds, "read_gbps": gbps,
                "decode_steps": stats["decode_steps"], "prefill_tokens": stats["prefill_tokens"]}
        copy = benchmark.extra_info.get("roofline_copy_bytes_per_s")
        if copy:
            info["roofline_fraction"] = gbps * 1e9 / copy
        benchmark.extra_info.update(info)
