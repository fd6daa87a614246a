"""Autoregressive generation with a KV cache, and sampling with temperature, top-k and top-p.

Without a cache every new token re-runs the model over the whole context: O(T) tokens of work per token.
With it, the prompt is run once (prefill, the backend's causal attention), each layer keeps its keys and
values, and each later step runs the model over one token that attends to the cached keys.

This module works on any model with GPT's forward(idx, kv_cache=...) and imports nothing of the project, so that
GPT.generate can call it; loading a model and a vocabulary for sample.py is nanogpt/sampling.py.
"""
import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer, (n_layer, B, H, max_len, D), filled up to `length` positions."""

    def __init__(self, n_layer, max_len):
        self.n_layer = n_layer
        self.max_len = max_len
        self.k = self.v = None  # allocated at the first append, in the dtype and device of the keys
        self.length = 0

    def layer(self, i):
        return _LayerCache(self, i)

    def advance(self, t):
        self.length += t

    def reset(self):
        self.length = 0


class _LayerCache:

    def __init__(self, cache: KVCache, index: int):
        self.cache = cache
        self.index = index

    @property
    def length(self):
        return self.cache.length

    def append(self, k, v):
        c = self.cache
        if c.k is None or c.k.shape[1:3] != k.shape[:2] or c.k.dtype != k.dtype:
            B, H, _, D = k.shape
            c.k = torch.empty(c.n_layer, B, H, c.max_len, D, dtype=k.dtype, device=k.device)
            c.v = torch.empty_like(c.k)
        start, end = c.length, c.length + k.size(2)
        c.k[self.index, :, :, start:end] = k
        c.v[self.index, :, :, start:end] = v
        return c.k[self.index, :, :, :end], c.v[self.index, :, :, :end]

    def attend(self, q, k, v):
        """New queries (positions length..length+Tq-1) against every cached key up to their own position."""
        Tq, Tk = q.size(2), k.size(2)
        if Tq == 1:  # one new token sees the whole cache: no mask needed
            return F.scaled_dot_product_attention(q, k, v)
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


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


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None):
    """Append max_new_tokens sampled tokens to each row of idx (B, T). Once the sequence is longer than the
    model's block_size, the context slides: the last block_size tokens are re-run (the cache is rebuilt
    for the cropped window), which gives exactly the tokens that generation without a cache gives."""
    block_size = model.config.block_size
    cache = KVCache(model.config.n_layer, block_size) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is not None and 0 < cache.length < block_size:
            logits, _ = model(idx[:, -1:], kv_cache=cache)  # decode: one new token
        else:
            if cache is not None:
                cache.reset()  # first step, or the window slid: prefill the (cropped) context
            logits, _ = model(idx[:, -block_size:], kv_cache=cache)
        idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
