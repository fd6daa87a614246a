"""The GPT language model, nanoGPT-style, with swappable attention / LayerNorm / GELU backends.

References:
1) OpenAI's GPT-2: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
"""
import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt.backends import capped, check_backend_name, get_backend, linear_loss_head
from nanogpt.errors import ConfigError
from nanogpt.generate import generate
from nanogpt.hardware import device_peak_flops
from nanogpt.kv_cache import KVCache, query_positions
from nanogpt.pretrained import load_gpt2


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    attn: str = "sdpa"  # kernel backend (attention, LayerNorm, GELU): naive | sdpa | triton (nanogpt/backends.py)
    gelu: str = "none"  # "none": exact erf GELU (nanoGPT); "tanh": the approximation GPT-2 was trained with
    # model(idx, targets) with the backend's fused loss head where it has one (triton: the logits are never built,
    # the memory win, and the model returns (None, loss)); False: nanoGPT's (logits, loss) with every backend
    fused_loss_head: bool = True
    # options of today's GPTs, off by default (GPT-2 as it is): each goes to the backend's kernels
    n_kv_head: int = 0  # key/value heads, dividing n_head (GQA; 1: MQA); 0: n_head
    attn_window: int = 0  # sliding window: a query sees itself and the attn_window - 1 keys before it; 0: all
    attn_softcap: float = 0.0  # attention scores capped as softcap * tanh(s / softcap) (Gemma 2); 0: off
    logit_softcap: float = 0.0  # the final logits capped the same way (Gemma 2, modded-nanogpt); 0: off
    norm: str = "layer"  # "layer": LayerNorm (GPT-2); "rms": RMSNorm, a gain and no bias (Llama, nanochat)
    rope: bool = False  # rotary positions on q and k (base ROPE_BASE) instead of learned position embeddings

    def __post_init__(self):
        # the model's own checks, in one place: the training and sampling configs build a GPTConfig to run them
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                              f"choose n_embd as a multiple of n_head")
        check_backend_name(self.attn)  # an unknown name fails here, listing the known ones
        if self.gelu not in ("none", "tanh"):
            raise ConfigError(f"gelu={self.gelu!r}: choose 'none' (exact) or 'tanh'")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ConfigError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (or be 0: one kv head "
                              f"per head)")
        if self.norm not in ("layer", "rms"):
            raise ConfigError(f"norm={self.norm!r}: choose 'layer' (LayerNorm, GPT-2) or 'rms' (RMSNorm)")
        if self.attn_window < 0:
            raise ConfigError(f"attn_window={self.attn_window} must be >= 0 (0: no sliding window)")
        for key in ("attn_softcap", "logit_softcap"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0 (0: no cap; Gemma 2 uses 50 and 30)")

    # the options of today's GPTs above: their defaults are GPT-2 (what its pretrained weights are)
    OPTIONS = ("n_kv_head", "attn_window", "attn_softcap", "logit_softcap", "norm", "rope")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def attention_options(self) -> dict:
        """The keyword arguments every backend's attention and decode_attention take for these options."""
        return dict(softcap=self.attn_softcap or None,
                    window=(self.attn_window - 1, 0) if self.attn_window else None)


def model_args(cfg, **overrides) -> dict:
    """The GPTConfig keys that `cfg` (a TrainConfig, a BenchConfig, a GPTConfig, ...) carries, with their values,
    then `overrides`: the keys come from GPTConfig itself, never from a hand-written list."""
    args = {f.name: getattr(cfg, f.name) for f in fields(GPTConfig) if hasattr(cfg, f.name)}
    args.update(overrides)
    return args


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm cannot turn the bias off alone)."""

    def __init__(self, ndim, bias, backend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.backend = backend

    def forward(self, x):
        return self.backend.layer_norm(x, self.weight, self.bias, 1e-5)

    def add_and_norm(self, x, residual):
        """(x + residual, LayerNorm(x + residual)): the residual stream's update and this LayerNorm, fused into one
        pass over memory where the backend has a kernel for it."""
        return self.backend.add_layer_norm(x, residual, self.weight, self.bias, 1e-5)


ROPE_BASE = 10000.0  # Llama's and GPT-NeoX's


class CausalSelfAttention(nn.Module):

    def __init__(self, config, backend):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        kv_width = self.n_kv_head * self.head_dim  # n_embd without GQA
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_embd = config.n_embd
        self.kv_width = kv_width
        self.dropout = config.dropout
        self.backend = backend
        self.options = config.attention_options()
        self.rope = config.rope
        if self.rope and backend.rotary is None:
            raise ConfigError(f"attn={config.attn} has no rotary embedding: use rope=False or another backend")

    def forward(self, x, kv=None, lengths=None):
        """Without kv: training and uncached inference. With kv (this layer's LayerKV) and no lengths: prefill,
        tokens at positions 0..T-1, whose keys and values go into the cache. With both: decode, the T new tokens
        are the last T of each row's lengths[b] valid positions (lengths counts them already)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split([self.n_embd, self.kv_width, self.kv_width], dim=2)
        # (B, T, C) -> (B, nh, T, hs): strided views; the Triton kernel reads them without a copy
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rope:  # the cache keeps rotated keys: a key's rotation depends only on its own position
            positions = query_positions(lengths, T) if lengths is not None else torch.arange(T, device=x.device)
            q = self.backend.rotary(q, positions, ROPE_BASE)
            k = self.backend.rotary(k, positions, ROPE_BASE)
        if kv is not None and lengths is not None:
            # decode: the new keys go into the static cache, the new queries attend to all the row's keys
            kv.write(k, v, lengths)
            y = self.backend.decode_attention(q.to(kv.k.dtype), kv.k, kv.v, lengths, **self.options)
        else:
            if kv is not None:  # prefill: the same causal kernel as training, then remember k, v
                kv.prefill(k, v)
            y = self.backend.attention(q, k, v, self.dropout if self.training else 0.0, **self.options)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config, backend):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.backend = backend
        self.approximate = config.gelu

    def forward(self, x):
        # c_fc's bias is added inside the GELU so that a fused kernel does bias + GELU in one pass
        x = self.backend.gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias, self.approximate)
        return self.dropout(self.c_proj(x))


class RMSNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, no centring and no bias (GPTConfig.norm="rms")."""

    def __init__(self, ndim, backend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.backend = backend

    def forward(self, x):
        return self.backend.rms_norm(x, self.weight, 1e-5)

    def add_and_norm(self, x, residual):
        return self.backend.add_rms_norm(x, residual, self.weight, 1e-5)


def norm_layer(config, backend):
    """The model's normalization layer for config.norm, on the backend's kernels."""
    if config.norm == "rms":
        if backend.rms_norm is None:
            raise ConfigError(f"attn={config.attn} has no RMSNorm: use norm='layer' or another backend")
        return RMSNorm(config.n_embd, backend)
    return LayerNorm(config.n_embd, config.bias, backend)


class Block(nn.Module):
    """A pre-LN transformer block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)).

    Each residual add is fused into the LayerNorm right after it (add_and_norm), so the MLP's output is added by
    the *next* LayerNorm: the next block's ln_1, or the model's ln_f after the last block. A block therefore takes
    the stream x together with the previous block's MLP output not yet added to it (`pending`, None in the first
    block) and returns the same pair for the next one."""

    def __init__(self, config, backend):
        super().__init__()
        self.ln_1 = norm_layer(config, backend)
        self.attn = CausalSelfAttention(config, backend)
        self.ln_2 = norm_layer(config, backend)
        self.mlp = MLP(config, backend)

    def forward(self, x, pending=None, kv=None, lengths=None):
        if pending is None:
            h = self.ln_1(x)
        else:
            x, h = self.ln_1.add_and_norm(x, pending)  # x = x + pending; h = ln_1(x)
        x, h = self.ln_2.add_and_norm(x, self.attn(h, kv, lengths))  # x = x + attn(...); h = ln_2(x)
        return x, self.mlp(h)


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.backend = backend = get_backend(config.attn)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if config.rope else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, backend) for _ in range(config.n_layer)]),
            ln_f=norm_layer(config, backend),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # training's lm_head + cross-entropy: the backend's fused head (no logits) if it has one and it is wanted
        fused = backend.loss_head if config.fused_loss_head else None
        self.loss_head = fused or linear_loss_head
        # weight tying (https://paperswithcode.com/method/weight-tying)
        self.transformer.wte.weight = self.lm_head.weight
        self.kv_cache = None  # a KVCache once setup_kv_cache is called (sampling); never in the state_dict

        self.apply(self._init_weights)
        # GPT-2 paper: residual projections scaled by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count. The position embeddings are subtracted by default; the token embeddings
        stay, since they are tied to (and used as) the LM head's weights."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _embed(self, idx, pos=None, what="forward"):
        """Token plus position embeddings (then dropout), for forward, prefill and decode. pos: (t,) or (b, t)
        positions, default 0..t-1."""
        t = idx.size(1)
        if pos is None:
            if t > self.config.block_size:
                raise ValueError(f"cannot {what} a sequence of length {t}: block_size is only "
                                 f"{self.config.block_size} (crop the context to the last {self.config.block_size} "
                                 f"tokens)")
            pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:  # with rope the positions enter through q and k instead
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    def _blocks(self, x, kv_layers=None, lengths=None):
        """The blocks, then ln_f. A block's MLP output stays pending until the next LayerNorm adds it to the residual
        stream (fused add + LayerNorm, see Block). kv_layers: the cache's layers (prefill, decode)."""
        pending = None
        for i, block in enumerate(self.transformer.h):
            x, pending = block(x, pending, kv_layers[i] if kv_layers is not None else None, lengths)
        return self.transformer.ln_f(x) if pending is None else self.transformer.ln_f.add_and_norm(x, pending)[1]

    def forward(self, idx, targets=None):
        x = self._blocks(self._embed(idx))

        if targets is not None:
            # the loss head: logits then cross-entropy, or (config.fused_loss_head with a backend that has one,
            # triton) a fused kernel that never builds the (b, t, vocab) logits and returns None for them
            logits, loss = self.loss_head(x, self.lm_head.weight, targets, ignore_index=-1,
                                          softcap=self.config.logit_softcap or None)
        else:
            # inference: only the last position's logits are needed (the list [-1] keeps the time dim)
            logits = self._logits(x[:, [-1], :])
            loss = None
        return logits, loss

    def _logits(self, x):
        return capped(self.lm_head(x), self.config.logit_softcap or None)

    # --------------------------------------------------------------------------------------------
    # generation with the KV cache (nanogpt/kv_cache.py): the model owns it, sampling only drives it

    def setup_kv_cache(self, batch_size, dtype=None, device=None):
        """Allocate the static cache, (batch_size, n_kv_head, block_size, head_dim) keys and values per layer, in
        `dtype` (default: the weights'; under autocast pass the autocast dtype). Reused when it already fits;
        every row starts empty."""
        weight = self.lm_head.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        if self.kv_cache is None or not self.kv_cache.fits(batch_size, dtype, device):
            self.kv_cache = None  # free the old buffers first
            c = self.config
            self.kv_cache = KVCache(c.n_layer, batch_size, c.kv_heads, c.block_size, c.n_embd // c.n_head, dtype,
                                    device)
        self.kv_cache.lengths.zero_()
        return self.kv_cache

    def _check_cache(self, b, what):
        if self.kv_cache is None or self.kv_cache.batch_size != b:
            have = "none" if self.kv_cache is None else f"batch {self.kv_cache.batch_size}"
            raise ValueError(f"{what} of a batch of {b} needs model.setup_kv_cache({b}) first (the cache has {have})")
        if self.backend.decode_attention is None:
            raise ValueError(f"attention backend {self.config.attn!r} has no decode attention: sample with "
                             f"use_cache=False or another backend")

    def prefill(self, idx, lengths=None):
        """Run idx (B, T) from position 0, the causal kernel as in training, and fill the cache with its keys and
        values. lengths (B,) int: the valid tokens of each row (right-padded prompts); default T for every row.
        Returns the logits (B, 1, V) of each row's last valid token. Exactly the uncached forward's logits."""
        b, t = idx.size()
        self._check_cache(b, "prefill")
        x = self._blocks(self._embed(idx, what="prefill"), self.kv_cache.layers)
        if lengths is None:
            self.kv_cache.lengths.fill_(t)
            return self._logits(x[:, [-1], :])
        self.kv_cache.lengths.copy_(lengths)
        last = x[torch.arange(b, device=idx.device), lengths.long() - 1]
        return self._logits(last[:, None, :])

    def decode(self, idx):
        """One decoding step: idx (B, Tq) new tokens, appended after each row's valid positions; returns their
        logits (B, Tq, V). Static shapes, no host sync (.item()), nothing allocated on the CPU: this is the
        function that is compiled and captured as a CUDA graph. The caller keeps lengths + Tq <= block_size."""
        b, t = idx.size()
        self._check_cache(b, "decode")
        lengths = self.kv_cache.lengths + t  # valid positions once the new tokens are in
        x = self._blocks(self._embed(idx, query_positions(lengths, t)), self.kv_cache.layers, lengths)
        self.kv_cache.lengths.copy_(lengths)
        return self._logits(x)

    def crop_block_size(self, block_size):
        """Model surgery for a smaller block size, e.g. GPT-2's 1024 cropped to 256 for fine-tuning."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size={block_size} is larger than the model's {self.config.block_size}: "
                             f"a model can only be cropped to a smaller context")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """nanoGPT's entry point. nanogpt/pretrained.py reads the files and never imports this module."""
        return load_gpt2(lambda args: cls(GPTConfig(**args)), name_or_path, override_args)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        # weight-decay every 2-D tensor (matmul weights, embeddings); not biases nor LayerNorm gains
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)

    def flops_per_token(self, seq_len=None):
        """nanoGPT's (PaLM appendix B) count: 6N for the weights plus 12*L*H*Q*T for attention scores,
        forward and backward together; with a sliding window a query scores attn_window keys, not T."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        T = seq_len or cfg.block_size
        keys = min(T, cfg.attn_window) if cfg.attn_window else T
        return 6 * N + 12 * L * H * Q * keys

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None, seq_len=None):
        """Model FLOPs utilization: achieved FLOP/s over the device's dense bf16/fp16 peak.

        `fwdbwd_per_iter` sequences of length `seq_len` (default block_size) per `dt` seconds. The peak
        comes from `peak_flops` when given, else from the table of known GPUs for the device the model
        is on. Returns None when the peak is unknown (a CPU, an unlisted GPU): never a silent guess.
        """
        peak = peak_flops or device_peak_flops(next(self.parameters()).device)
        if not peak:
            return None
        T = seq_len or self.config.block_size
        flops_per_iter = self.flops_per_token(T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 context="slide", generator=None):
        """nanoGPT's entry point: continue each sequence of idx (b, t) by max_new_tokens tokens.
        nanogpt/generate.py works on any model and never imports this module."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        use_cache=use_cache, context=context, generator=generator)
