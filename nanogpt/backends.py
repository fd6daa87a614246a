"""The kernel backend registry: one name -> the attention, LayerNorm, GELU and loss-head kernels the model runs.

The config key that picks one is `attn` (nanoGPT's name, kept for its users), but a kernel backend selects
every kernel of the model, not only attention. Adding a backend is one `register_backend` call; the model
never branches on the name. Each implementation has one name everywhere (registry, benchmarks, reports):
naive (plain tensor math), sdpa (PyTorch's F.* functions), triton (kernels/).

Every backend implements the same functions, and may add a fused one:
    attention(q, k, v, dropout_p, softcap=None, window=None) -> y
                                           q: (B, H, T, D), k, v: (B, H_kv, T, D) with H_kv dividing H (GQA/MQA:
                                           query head h uses kv head h // (H / H_kv)); causal, scale 1/sqrt(D);
                                           softcap: scores become softcap * tanh(score / softcap) (Gemma 2);
                                           window=(left, 0): query i sees keys i - left .. i only (sliding window)
    layer_norm(x, weight, bias, eps) -> y  normalizes the last dimension; bias may be None
    gelu(x, bias, approximate) -> y        GELU of x + bias, exact ("none", erf) or "tanh"; bias may be None
    add_layer_norm(x, residual, weight, bias, eps) -> (h, y)
                                           h = x + residual (the residual stream's update), y = layer_norm(h);
                                           left out (None), it is that composition of the backend's layer_norm
    rms_norm(x, weight, eps) -> y          RMSNorm of the last dimension, x / sqrt(mean(x^2) + eps) * weight
                                           (GPTConfig.norm="rms"); left out (None), the backend cannot run it
    add_rms_norm(x, residual, weight, eps) -> (h, y)
                                           as add_layer_norm; left out, the composition of the backend's rms_norm
    rotary(x, positions, base) -> y       RoPE of x (B, H, T, D) by integer positions (T,) or (B, T): the halves
                                           x[..., :D/2], x[..., D/2:] rotated as pairs by position * base^(-2i/D)
                                           (GPTConfig.rope); left out (None), the backend cannot run it
    decode_attention(q, k, v, lengths, softcap=None, window=None) -> y
                                           q: (B, H, Tq, D) new queries; k, v: the KV cache (B, H_kv, Tmax, D);
                                           lengths: (B,) int32 valid positions per row, the new ones included;
                                           query i of row b sits at lengths[b] - Tq + i and sees keys up to it
                                           (and, with window=(left, 0), none before its position - left)
and, where the backend has one, a fused loss head for training (None: the model computes the logits, then
cross-entropy, `linear_loss_head`; GPTConfig.fused_loss_head=False makes it do so anyway):
    loss_head(x, weight, targets, ignore_index, softcap=None) -> (None, loss)
        loss = F.cross_entropy(capped(x @ weight.T, softcap), targets, ignore_index=ignore_index) over all
        positions, without building the logits (so there are none to return)

A backend also declares what it needs to run: `runs_triton` (its kernels are Triton programs: a CUDA GPU, or
Triton's interpreter on a CPU). `check_device(device)` turns that into the one-line ConfigError that train.py,
sample.py and `python -m bench` print before any work starts; tests and benchmarks ask the same flag instead of
comparing names.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nanogpt.errors import ConfigError
from nanogpt.kv_cache import query_positions


@dataclass(frozen=True)
class Backend:
    name: str
    attention: Callable
    layer_norm: Callable
    gelu: Callable
    add_layer_norm: Callable | None = None
    rms_norm: Callable | None = None  # None: the backend cannot run GPTConfig.norm="rms"
    add_rms_norm: Callable | None = None
    rotary: Callable | None = None  # None: the backend cannot run GPTConfig.rope
    decode_attention: Callable | None = None  # None: the backend cannot decode from a KV cache
    loss_head: Callable | None = None  # None: no fused head, the model builds the logits (linear_loss_head)
    runs_triton: bool = False  # Triton programs: a CUDA GPU, or Triton's interpreter on a CPU (slow, for testing)
    description: str = ""

    def __post_init__(self):
        if self.add_layer_norm is None:  # frozen: set once here, to the unfused composition
            object.__setattr__(self, "add_layer_norm", _unfused_add_norm(self.layer_norm))
        if self.add_rms_norm is None and self.rms_norm is not None:
            object.__setattr__(self, "add_rms_norm", _unfused_add_norm(self.rms_norm))

    def check_device(self, device) -> None:
        """Raise the one-line ConfigError (the problem and the fix) unless this backend can run on `device`."""
        if not self.runs_triton:
            return
        device_type = torch.device(device).type
        if device_type == "cuda":
            return
        if device_type == "cpu":
            from kernels._common import interpreting  # here: triton is imported only for a backend that runs it
            if interpreting():
                return
            raise ConfigError(f"attn={self.name} on the CPU runs only through Triton's interpreter: set "
                              f"TRITON_INTERPRET=1 (slow, for testing), or use a CUDA GPU or --attn=sdpa")
        raise ConfigError(f"attn={self.name} runs Triton kernels, which need a CUDA GPU (or the CPU with "
                          f"TRITON_INTERPRET=1), not {device_type}: use --attn=sdpa")


def _unfused_add_norm(norm: Callable) -> Callable:
    """add_layer_norm / add_rms_norm as two steps: the residual add, then the backend's own norm (naive, sdpa)."""
    def add_norm(x, residual, *args):
        h = x + residual
        return h, norm(h, *args)
    return add_norm


# name -> a zero-argument factory, so a backend's imports (triton) happen only when it is used
_REGISTRY: dict[str, Callable[[], Backend]] = {}
_LOADED: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _REGISTRY[name] = factory
    _LOADED.pop(name, None)


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)
    _LOADED.pop(name, None)


def available_backends() -> list[str]:
    return list(_REGISTRY)


def check_backend_name(name: str) -> None:
    """The one check of a kernel backend name, without importing the backend (triton) yet."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown kernel backend attn={name!r}: choose one of {', '.join(available_backends())}")


def get_backend(name: str) -> Backend:
    check_backend_name(name)
    if name not in _LOADED:
        _LOADED[name] = _REGISTRY[name]()
    return _LOADED[name]


# ----------------------------------------------------------------------------------------------
# the attention options' math, shared by the naive and sdpa backends


def capped(scores, softcap=None):
    """softcap * tanh(scores / softcap) (Gemma 2's attention and final-logit softcaps); None: the scores as they are."""
    return scores if not softcap else softcap * torch.tanh(scores / softcap)


def expand_kv(k, n_head):
    """(B, H_kv, T, D) -> (B, n_head, T, D): each kv head repeated for the query heads that share it (GQA), in
    memory; the reference way, which the Triton kernels avoid by indexing kv head h // group."""
    group = n_head // k.size(1)
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def visible_keys(query_pos, key_pos, window=None):
    """bool, broadcast: a query at query_pos sees a key at key_pos iff key_pos <= query_pos (and, with
    window=(left, 0), key_pos >= query_pos - left)."""
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos >= query_pos - window[0]
    return visible


def causal_mask(T, window, device):
    """(T, T) bool: query i sees key j (visible_keys)."""
    positions = torch.arange(T, device=device)
    return visible_keys(positions[:, None], positions[None, :], window)


# ----------------------------------------------------------------------------------------------
# naive: the reference everything else is checked against, written as plain tensor math


def naive_attention(q, k, v, dropout_p=0.0, softcap=None, window=None):
    T = q.size(-2)
    k, v = expand_kv(k, q.size(1)), expand_kv(v, q.size(1))
    att = capped((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))), softcap)
    att = att.masked_fill(~causal_mask(T, window, q.device), float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


def decode_mask(lengths, Tq, Tmax, window=None):
    """(B, 1, Tq, Tmax) bool, True where query i of row b (at position lengths[b] - Tq + i) may see key j (with
    window=(left, 0): only keys from its position - left). Built on the device from the lengths tensor: no
    .item(), the same shape every step (CUDA graphs)."""
    keys = torch.arange(Tmax, device=lengths.device)[None, None, :]
    return visible_keys(query_positions(lengths, Tq)[:, :, None], keys, window)[:, None]


def naive_decode_attention(q, k, v, lengths, softcap=None, window=None):
    k, v = expand_kv(k, q.size(1)), expand_kv(v, q.size(1))
    att = capped((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))), softcap)
    att = att.masked_fill(~decode_mask(lengths, q.size(-2), k.size(-2), window), float("-inf"))
    return torch.softmax(att, dim=-1) @ v


def naive_layer_norm(x, weight, bias=None, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as nn.LayerNorm
    y = (x - mean) * torch.rsqrt(var + eps) * weight
    return y + bias if bias is not None else y


def naive_rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def naive_rotary(x, positions, base=10000.0):
    """RoPE in fp32 from the definition (naive and sdpa: PyTorch has no F.* function for it)."""
    half = x.size(-1) // 2
    inv_freq = base ** (-2.0 * torch.arange(half, dtype=torch.float32, device=x.device) / x.size(-1))
    angle = positions.float()[..., None] * inv_freq  # (T, half) or (B, T, half)
    if angle.dim() == 3:
        angle = angle[:, None]  # (B, 1, T, half): one row's positions for all its heads
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def naive_gelu(x, bias=None, approximate="none"):
    if bias is not None:
        x = x + bias
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def linear_loss_head(x, weight, targets, ignore_index=-1, softcap=None):
    """The LM head and its loss as nanoGPT computes them: the (B, T, V) logits (capped with a logit softcap),
    then cross-entropy on them."""
    logits = capped(F.linear(x, weight), softcap)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=ignore_index)
    return logits, loss


# ----------------------------------------------------------------------------------------------
# sdpa: PyTorch's fused kernels (flash / memory-efficient / cuDNN attention where the device has them)


def sdpa_attention(q, k, v, dropout_p=0.0, softcap=None, window=None):
    if softcap:  # SDPA has no score modifier (flex_attention would): the plain math, as naive
        return naive_attention(q, k, v, dropout_p, softcap, window)
    gqa = q.size(1) != k.size(1)
    if window is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q.size(-2), window, q.device),
                                              dropout_p=dropout_p, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)


def sdpa_decode_attention(q, k, v, lengths, softcap=None, window=None):
    if softcap:
        return naive_decode_attention(q, k, v, lengths, softcap, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=decode_mask(lengths, q.size(-2), k.size(-2), window),
                                          enable_gqa=q.size(1) != k.size(1))


def sdpa_layer_norm(x, weight, bias=None, eps=1e-5):
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


def sdpa_rms_norm(x, weight, eps=1e-5):
    return F.rms_norm(x, (x.size(-1),), weight, eps)


def sdpa_gelu(x, bias=None, approximate="none"):
    return F.gelu(x + bias if bias is not None else x, approximate=approximate)


def _triton_backend() -> Backend:
    import kernels  # imported here: triton is only needed when this backend is used

    def attention(q, k, v, dropout_p=0.0, softcap=None, window=None):
        return kernels.attention(q, k, v, causal=True, dropout_p=dropout_p, softcap=softcap, window=window)

    def decode_attention(q, k, v, lengths, softcap=None, window=None):
        return kernels.decode_attention(q, k, v, lengths, softcap=softcap, window=window)

    def loss_head(x, weight, targets, ignore_index=-1, softcap=None):
        return None, kernels.linear_cross_entropy(x, weight, targets, ignore_index=ignore_index, softcap=softcap)

    return Backend(
        "triton", attention, kernels.layer_norm, kernels.gelu, add_layer_norm=kernels.add_layer_norm,
        rms_norm=kernels.rms_norm, add_rms_norm=kernels.add_rms_norm, rotary=kernels.rotary,
        decode_attention=decode_attention, loss_head=loss_head, runs_triton=True,
        description="handwritten Triton kernels: fused causal attention (FlashAttention-2), residual add + "
                    "LayerNorm / RMSNorm, bias+GELU, RoPE, split-K decode attention, linear + cross-entropy without the logits",
    )


REFERENCE = "naive"  # the backend every other one is checked against (tests/, bench/)

# naive and sdpa leave add_layer_norm and add_rms_norm out (`x + residual`, then their layer_norm) and have no fused loss head
register_backend("naive", lambda: Backend(
    "naive", naive_attention, naive_layer_norm, naive_gelu, rms_norm=naive_rms_norm, rotary=naive_rotary,
    decode_attention=naive_decode_attention,
    description="explicit tensor math: the reference"))
register_backend("sdpa", lambda: Backend(
    "sdpa", sdpa_attention, sdpa_layer_norm, sdpa_gelu, rms_norm=sdpa_rms_norm, rotary=naive_rotary,
    decode_attention=sdpa_decode_attention,
    description="F.scaled_dot_product_attention, F.layer_norm, F.rms_norm, F.gelu, F.linear + F.cross_entropy"))
register_backend("triton", _triton_backend)
