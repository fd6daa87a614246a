"""The backend registry: one name -> the attention, LayerNorm and GELU a Block uses, and the GPT's loss head.

Adding a backend is one `register_backend` call; the model never branches on the name.

Every backend implements the same three functions:
    attention(q, k, v, dropout_p) -> y     q, k, v: (B, H, T, D), causal, scale 1/sqrt(D)
    layer_norm(x, weight, bias, eps) -> y  normalizes the last dimension; bias may be None
    gelu(x, bias, approximate) -> y        GELU of x + bias, exact ("none", erf) or "tanh"; bias may be None
and the loss head of training (None: the model's default, `linear_loss_head`):
    loss_head(x, weight, targets, ignore_index) -> (logits or None, loss)
        loss = F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index) over all positions; a fused
        head returns None for the logits it never builds
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Backend:
    name: str
    attention: Callable
    layer_norm: Callable
    gelu: Callable
    loss_head: Callable | None = None
    description: str = ""


# name -> a zero-argument factory, so a backend's imports (triton) happen only when it is used
_REGISTRY: dict[str, Callable[[], Backend]] = {}
_LOADED: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _REGISTRY[name] = factory
    _LOADED.pop(name, None)


def available_backends() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(available_backends())}")
    if name not in _LOADED:
        _LOADED[name] = _REGISTRY[name]()
    return _LOADED[name]


# ----------------------------------------------------------------------------------------------
# naive: the reference everything else is checked against, written as plain tensor math


def naive_attention(q, k, v, dropout_p=0.0):
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    causal_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal_mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


def naive_layer_norm(x, weight, bias=None, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as nn.LayerNorm
    y = (x - mean) * torch.rsqrt(var + eps) * weight
    return y + bias if bias is not None else y


def naive_gelu(x, bias=None, approximate="none"):
    if bias is not None:
        x = x + bias
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def linear_loss_head(x, weight, targets, ignore_index=-1):
    """The LM head and its loss as nanoGPT computes them: the (B, T, V) logits, then cross-entropy on them."""
    logits = F.linear(x, weight)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=ignore_index)
    return logits, loss


# ----------------------------------------------------------------------------------------------
# sdpa: PyTorch's fused kernels (flash / memory-efficient / cuDNN attention where the device has them)


def sdpa_attention(q, k, v, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


def sdpa_layer_norm(x, weight, bias=None, eps=1e-5):
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


def sdpa_gelu(x, bias=None, approximate="none"):
    return F.gelu(x + bias if bias is not None else x, approximate=approximate)


def _triton_backend() -> Backend:
    import kernels  # imported here: triton is only needed when this backend is used

    def attention(q, k, v, dropout_p=0.0):
        return kernels.attention(q, k, v, causal=True, dropout_p=dropout_p)

    def loss_head(x, weight, targets, ignore_index=-1):
        return None, kernels.linear_cross_entropy(x, weight, targets, ignore_index=ignore_index)

    return Backend(
        "triton", attention, kernels.layer_norm, kernels.gelu, loss_head=loss_head,
        description="handwritten Triton kernels: fused causal attention (FlashAttention-2), LayerNorm, bias+GELU, "
                    "linear + cross-entropy without the logits",
    )


register_backend("naive", lambda: Backend(
    "naive", naive_attention, naive_layer_norm, naive_gelu, loss_head=linear_loss_head,
    description="explicit tensor math: the reference"))
register_backend("sdpa", lambda: Backend(
    "sdpa", sdpa_attention, sdpa_layer_norm, sdpa_gelu, loss_head=linear_loss_head,
    description="F.scaled_dot_product_attention, F.layer_norm, F.gelu, F.linear + F.cross_entropy"))
register_backend("triton", _triton_backend)
