"""Autoregressive generation with the model's KV cache, and sampling with temperature, top-k and top-p.

Without a cache every new token re-runs the model over the whole context: O(T) tokens of work per token.
With it (nanogpt/kv_cache.py, owned by the model), the prompt is run once (prefill, the backend's causal
attention), each layer keeps its keys and values in static buffers, and each later step runs the model over one
token that attends to the cached keys (the backend's decode attention): the same backend, `attn`, for both.

Past block_size the positions run out, and `context` says what happens:
  slide  (default, exact) every step re-runs the last block_size tokens from position 0 (a prefill): the same
         tokens as generation without a cache, at the cost of uncached generation.
  shift  when the window is full, keep its last half, re-run it once to refill the cache, then decode from the
         cache again: one re-run per block_size/2 tokens. Not the uncached tokens: after a shift a token sees
         between block_size/2 and block_size earlier tokens instead of always block_size.

This module works on any model with GPT's prefill/decode/forward and imports nothing of the project, so that
GPT.generate can call it; loading a model and a vocabulary for sample.py is nanogpt/sampling.py.
"""
import weakref

import torch
import torch.nn.functional as F

CONTEXT_MODES = ("slide", "shift")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use top_k=1 for greedy decoding)")
    logits = logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# compiled (prefill, decode, forward) per model: compiling is slow, so a model is compiled once per process
_COMPILED = weakref.WeakKeyDictionary()


def model_steps(model, compile=False):
    """(prefill, decode, forward) of the model, as plain methods or each compiled on its own: the one-token decode
    step with static shapes (on CUDA as a CUDA graph: mode="reduce-overhead"), the prefill and the uncached
    forward with the shapes they meet (prompt, window)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: its model
    if not compile:
        return model.prefill, model.decode, model
    if model not in _COMPILED:
        on_cuda = model.lm_head.weight.device.type == "cuda"
        _COMPILED[model] = (
            torch.compile(model.prefill, fullgraph=True),
            torch.compile(model.decode, fullgraph=True, dynamic=False, mode="reduce-overhead" if on_cuda else None),
            torch.compile(model, fullgraph=True),
        )
    return _COMPILED[model]


def _cache_dtype(model):
    """The dtype the attention sees: autocast's when it is on (keys and values come out of autocast Linears)."""
    device_type = model.lm_head.weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.lm_head.weight.dtype


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, context="slide",
             compile=False, generator=None, stats=None):
    """Append max_new_tokens sampled tokens to each row of idx (B, T).

    use_cache=False re-runs the last block_size tokens at every step. With the cache, `context` ("slide" or
    "shift", see the module docstring) says what happens past block_size; "slide" gives exactly the tokens of
    use_cache=False. compile=True runs torch.compile'd prefill and decode steps. `stats`, a dict, receives the
    work done: model calls, decode steps, prefilled tokens, and cache positions read by the decode steps."""
    if context not in CONTEXT_MODES:
        raise ValueError(f"context={context!r}: choose one of {', '.join(CONTEXT_MODES)}")
    model = getattr(model, "_orig_mod", model)
    prefill, decode, forward = model_steps(model, compile)
    block_size = model.config.block_size
    counts = dict(calls=0, decode_steps=0, prefill_tokens=0, cache_positions_read=0)
    cuda_graphs = compile and idx.device.type == "cuda"

    def run_prefill(window):
        counts["calls"] += 1
        counts["prefill_tokens"] += window.size(1)
        return prefill(window)

    if not use_cache:
        for _ in range(max_new_tokens):
            counts["calls"] += 1
            logits, _ = forward(idx[:, -block_size:])
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, idx_next), dim=1)
    else:
        model.setup_kv_cache(idx.size(0), dtype=_cache_dtype(model), device=idx.device)
        logits = run_prefill(idx[:, -block_size:])
        length = min(idx.size(1), block_size)  # valid cache positions (every row alike here)
        for step in range(max_new_tokens):
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if step == max_new_tokens - 1:
                break
            if length < block_size:
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
                logits = decode(idx_next)
                length += 1
                counts["calls"] += 1
                counts["decode_steps"] += 1
                counts["cache_positions_read"] += length
            elif context == "slide":
                logits = run_prefill(idx[:, -block_size:])  # the window moved by one: re-run it
            else:  # shift: keep the last half of the window, re-run it once, decode from the cache again
                length = max(1, block_size // 2)
                logits = run_prefill(idx[:, -length:])
    if stats is not None:
        stats.update(counts)
    return idx


def bytes_read(model, stats, batch_size):
    """Bytes a generate() run had to read, from its stats: the weights once per model call, and per decode step
    the keys and values of the valid cache positions (a prefill's activations are not counted)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    elem = model.kv_cache.layers[0].k.element_size() if model.kv_cache is not None else 0
    kv_bytes_per_position = 2 * c.n_layer * c.n_embd * elem * batch_size  # keys and values, all heads
    return weight_bytes * stats["calls"] + kv_bytes_per_position * stats["cache_positions_read"]
