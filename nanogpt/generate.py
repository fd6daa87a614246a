"""Autoregressive generation with a KV cache, and sampling with temperature, top-k and top-p.

Without a cache every new token re-runs the model over the whole context: O(T) tokens of work per token.
With it, the prompt is run once (prefill, the backend's causal attention), each layer keeps its keys and
values, and each later step runs the model over one token that attends to the cached keys.
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


# ------------------------------------------------------------------------------------------------
# sample.py as a library function


def load_codec(ckpt):
    """(encode, decode): the dataset's character vocabulary when it has meta.pkl, else GPT-2 BPE."""
    from nanogpt.data import data_root, gpt2_encoding, load_meta
    dataset = (ckpt or {}).get("config", {}).get("dataset")
    meta = load_meta(data_root() / dataset) if dataset else None
    if meta is not None:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(s):
            unknown = sorted(set(c for c in s if c not in stoi))
            if unknown:
                raise ValueError(f"the prompt has characters outside the model's vocabulary: {unknown!r}")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    enc = gpt2_encoding()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def run_sample(cfg, out=print):
    """Load a model (checkpoint or GPT-2 weights), sample cfg.num_samples continuations of cfg.start in one
    batch, print them, and report tokens/s. Returns the decoded samples."""
    import time
    from contextlib import nullcontext
    from pathlib import Path

    from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint
    from nanogpt.config import ConfigError, SampleConfig, resolve_device, resolve_dtype
    from nanogpt.model import GPT
    from nanogpt.trainer import PTDTYPE

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.cuda.manual_seed(cfg.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = nullcontext() if dtype == "float32" else torch.amp.autocast(device_type=device_type,
                                                                           dtype=PTDTYPE[dtype])
    ckpt = None
    if cfg.init_from == "resume":
        path = Path(cfg.out_dir) / "ckpt.pt"
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path, attn=cfg.attn or None, dropout=0.0)
    else:
        model = GPT.from_pretrained(cfg.init_from, dict(dropout=0.0, **({"attn": cfg.attn} if cfg.attn else {})))
    model.eval().to(device)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    vocab_size = raw_model.config.vocab_size
    top_k = cfg.top_k
    if top_k > vocab_size and top_k == SampleConfig.top_k:
        top_k = vocab_size  # the default (200) on a small character vocabulary means "no cut"
    elif top_k > vocab_size:
        raise ConfigError(f"top_k={cfg.top_k} is larger than the vocabulary ({vocab_size} tokens): "
                          f"use --top_k={vocab_size} or less (0 disables it)")
    encode, decode = load_codec(ckpt)
    start = cfg.start
    if start.startswith("FILE:"):
        start = Path(start[5:]).read_text(encoding="utf-8")
    start_ids = encode(start)
    if not start_ids:
        raise ConfigError("the prompt encodes to no tokens: give a non-empty prompt")
    block_size = raw_model.config.block_size
    if len(start_ids) > block_size:
        raise ConfigError(f"the prompt is {len(start_ids)} tokens, longer than the model's context of "
                          f"{block_size}: shorten it")
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...].repeat(cfg.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad(), autocast:
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=top_k or None,
                     top_p=cfg.top_p, use_cache=cfg.use_cache, generator=generator)
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    samples = [decode(row.tolist()) for row in y]
    for s in samples:
        out(s)
        out("---------------")
    new_tokens = cfg.num_samples * cfg.max_new_tokens
    line = (f"generated {new_tokens} tokens in {dt:.2f}s: {new_tokens / dt:,.1f} tokens/s "
            f"({cfg.max_new_tokens / dt:,.1f} steps/s, batch {cfg.num_samples}, "
            f"KV cache {'on' if cfg.use_cache else 'off'}, {device}, {dtype})")
    if device_type == "cuda":
        # as gpt-fast: every decoding step reads all the weights once
        model_bytes = sum(p.numel() * p.element_size() for p in raw_model.parameters())
        line += f", {model_bytes * cfg.max_new_tokens / dt / 1e9:,.1f} GB/s of weights read"
    out(line)
    return samples
