"""sample.py as a library function: load a model (checkpoint or GPT-2 weights) and its vocabulary, generate,
print the samples and the speed. Builds on the model, the loaders and generate.py; nothing imports it but
sample.py.
"""
import sys
import time
from pathlib import Path

import torch

from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import SampleConfig
from nanogpt.data import dataset_dir, gpt2_encoding, load_meta, vocabulary_file
from nanogpt.errors import ConfigError, DataError

GPT2_VOCAB_SIZE = 50257
from nanogpt.generate import bytes_read, generate
from nanogpt.loading import model_from_checkpoint, model_from_pretrained
from nanogpt.runtime import setup_runtime


def load_codec(ckpt, vocab_size=None):
    """(encode, decode): the dataset's character vocabulary when it has meta.json/meta.pkl, else GPT-2 BPE. A model
    whose vocabulary is smaller than GPT-2's cannot be a BPE model: without its vocabulary file, it is an error
    (not a silent fall-back to BPE whose ids it does not have)."""
    config = (ckpt or {}).get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    # a checkpoint may come from anywhere: its dataset name is checked like one typed on the command line
    folder = dataset_dir(dataset, "the checkpoint's config.dataset") if dataset else None
    meta = load_meta(folder) if folder is not None else None
    if meta is not None and vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise DataError(f"{vocabulary_file(folder)} holds a vocabulary of {meta['vocab_size']} tokens, but the "
                        f"model has {vocab_size}: it is another dataset's vocabulary (put back the dataset the model "
                        f"was trained on, or point NANOGPT_DATA at the folder that holds it)")
    if meta is None and vocab_size is not None and vocab_size < GPT2_VOCAB_SIZE:
        where = f"in {folder}" if folder is not None else "(the checkpoint names no dataset)"
        raise DataError(f"the model has a {vocab_size}-token vocabulary, not GPT-2's, and no meta.json or meta.pkl "
                        f"was found {where}: put back the dataset folder it was trained on, or point NANOGPT_DATA "
                        f"at the folder that holds it")
    if meta is not None:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(s):
            unknown = sorted(set(c for c in s if c not in stoi))
            if unknown:
                raise ConfigError(f"the prompt has characters outside the model's vocabulary: {unknown!r}")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    enc = gpt2_encoding()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def run_sample(cfg, out=print):
    """Load a model (checkpoint or GPT-2 weights), sample cfg.num_samples continuations of cfg.start in one
    batch, print them, and report tokens/s. Returns the decoded samples."""
    rt = setup_runtime(cfg.device, cfg.dtype, seed=cfg.seed)
    device, device_type, dtype = rt.device, rt.device_type, rt.dtype
    ckpt = None
    if cfg.init_from == "resume":
        path = Path(cfg.out_dir) / "ckpt.pt"
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path, attn=cfg.attn or None, dropout=0.0)
    else:
        model = model_from_pretrained(cfg.init_from, dropout=0.0, attn=cfg.attn or None)
    model.backend.check_device(device)  # the backend is known only now (attn="" keeps the checkpoint's)
    model.eval().to(device)
    raw_model = model  # compiling happens inside generate(): the prefill and decode steps, each on its own
    vocab_size = raw_model.config.vocab_size
    top_k = cfg.top_k
    if top_k > vocab_size and top_k == SampleConfig.top_k:
        top_k = vocab_size  # the default (200) on a small character vocabulary means "no cut"
    elif top_k > vocab_size:
        raise ConfigError(f"top_k={cfg.top_k} is larger than the vocabulary ({vocab_size} tokens): "
                          f"use --top_k={vocab_size} or less (0 disables it)")
    encode, decode = load_codec(ckpt, vocab_size if ckpt is not None else None)
    start = cfg.start
    if start.startswith("FILE:"):
        start = read_prompt(start[5:])
    start_ids = encode(start)
    if not start_ids:
        raise ConfigError("the prompt encodes to no tokens: give a non-empty prompt")
    block_size = raw_model.config.block_size
    if len(start_ids) > block_size:
        print(f"notice: the prompt is {len(start_ids)} tokens, longer than the model's context of {block_size}: "
              f"keeping its last {block_size} tokens", file=sys.stderr)
        start_ids = start_ids[-block_size:]
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...].repeat(cfg.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad(), rt.autocast:
        if cfg.compile:  # compile the prefill and decode steps here, outside the timed part (its own generator)
            generate(model, x, min(2, cfg.max_new_tokens), temperature=cfg.temperature, top_k=top_k or None,
                     top_p=cfg.top_p, use_cache=cfg.use_cache, context=cfg.context, compile=True,
                     generator=torch.Generator(device=device).manual_seed(cfg.seed))
        rt.synchronize()
        t0 = time.perf_counter()
        stats = {}
        y = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=top_k or None,
                     top_p=cfg.top_p, use_cache=cfg.use_cache, context=cfg.context, compile=cfg.compile,
                     generator=generator, stats=stats)
        rt.synchronize()
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


def read_prompt(path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"the prompt file {path!r} is not UTF-8 text (byte {e.start}): convert it, e.g. "
                          f"iconv -t UTF-8 {path} > prompt.txt") from None
    except OSError as e:
        raise ConfigError(f"cannot read the prompt file {path!r}: {e.strerror} (give a readable text file)") from None
    if not text:
        raise ConfigError(f"the prompt file {path!r} is empty: give a file with the prompt's text")
    return text


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
