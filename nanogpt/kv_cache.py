"""The model's KV cache: static key/value buffers per layer and the number of valid positions of each row.

Static means allocated once, (B, H, block_size, D) per layer, and only written in place afterwards: a decoding
step has the same shapes and the same buffer addresses every time, which is what torch.compile's static shapes
and CUDA graphs need. Rows may hold different lengths (a ragged batch); the positions past a row's length are
ignored by every decode attention (they are masked or never read).

Imports nothing of the project (the model and the backends import it).
"""
import torch
import torch.nn as nn


def query_positions(lengths: torch.Tensor, Tq: int) -> torch.Tensor:
    """(B, Tq) int64: the positions of the Tq new tokens of each row, the last Tq of its lengths[b] valid ones
    (lengths already counts them): lengths[b] - Tq + i. On the device, no .item(): the same shapes every step.
    The one definition for the model (position embeddings), the cache (where keys go) and the backends' decode
    masks; kernels/decode_attention.py keeps its own (kernels never import nanogpt)."""
    return lengths.long()[:, None] - Tq + torch.arange(Tq, device=lengths.device)[None, :]


class LayerKV(nn.Module):
    """One layer's keys and values, (B, H, max_len, D) each."""

    def __init__(self, batch_size, n_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        # zeros, not empty: the sdpa/naive decode attentions multiply masked positions by weight 0, and 0 * NaN
        # from uninitialized memory would still be NaN. persistent=False: never part of a checkpoint.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def prefill(self, k, v):
        """Keys and values of positions 0..T-1 of every row, (B, H, T, D)."""
        T = k.size(2)
        self.k[:, :, :T] = k
        self.v[:, :, :T] = v

    def write(self, k, v, lengths):
        """The new tokens' keys and values, (B, H, Tq, D), at positions lengths[b] - Tq .. lengths[b] - 1 of row b
        (lengths already counts them). A scatter: per-row positions without leaving the device."""
        B, H, Tq, D = k.shape
        index = query_positions(lengths, Tq)[:, None, :, None].expand(B, H, Tq, D)
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))


class KVCache(nn.Module):
    """Every layer's LayerKV, and `lengths` (B,) int32: the valid positions of each row."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, dtype, device):
        super().__init__()
        self.layers = nn.ModuleList(LayerKV(batch_size, n_head, max_len, head_dim, dtype, device)
                                    for _ in range(n_layer))
        self.register_buffer("lengths", torch.zeros(batch_size, dtype=torch.int32, device=device), persistent=False)
        self.batch_size = batch_size

    def fits(self, batch_size, dtype, device):
        k = self.layers[0].k
        return self.batch_size == batch_size and k.dtype == dtype and k.device == torch.device(device)

