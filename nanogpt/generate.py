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
    raw_model = model  # compiling happens inside generate(): the prefill and decode steps, each on its own
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
        import sys
        print(f"notice: the prompt is {len(start_ids)} tokens, longer than the model's context of {block_size}: "
              f"keeping its last {block_size} tokens", file=sys.stderr)
        start_ids = start_ids[-block_size:]
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...].repeat(cfg.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad(), autocast:
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = {}
        y = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=top_k or None,
                     top_p=cfg.top_p, use_cache=cfg.use_cache, context=cfg.context, compile=cfg.compile,
                     generator=generator, stats=stats)
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
            f"KV cache {f'on, context={cfg.context}' if cfg.use_cache else 'off'}, "
            f"{'compiled, ' if cfg.compile else ''}attn={raw_model.config.attn}, {device}, {dtype})")
    if device_type == "cuda":
        # gpt-fast's count: every model call reads all the weights once, and a decode step also reads the valid
        # part of the KV cache; against the copy bandwidth measured here (read + write of a large buffer)
        gbps = bytes_read(raw_model, stats, cfg.num_samples) / dt / 1e9
        roofline = copy_bandwidth(device) / 1e9
        line += (f", {gbps:,.1f} GB/s of weights and cache read = {gbps / roofline:.0%} of the copy roofline "
                 f"({roofline:,.0f} GB/s)")
    out(line)
    return samples


def bytes_read(model, stats, batch_size):
    """Bytes a generate() run had to read, from its stats: the weights once per model call, and per decode step
    the keys and values of the valid cache positions (a prefill's activations are not counted)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    elem = model.kv_cache.layers[0].k.element_size() if model.kv_cache is not None else 0
    kv_bytes_per_position = 2 * c.n_layer * c.n_embd * elem * batch_size  # keys and values, all heads
    return weight_bytes * stats["calls"] + kv_bytes_per_position * stats["cache_positions_read"]


def copy_bandwidth(device, nbytes=2**28, reps=10):
    """Bytes/s of a large device-to-device copy (read + write counted), the best of `reps`: the roofline a
    decoding step, which is bound by reading memory, is compared with."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * nbytes / best
