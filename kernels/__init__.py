"""Handwritten Triton kernels, each a PyTorch custom op with autograd that torch.compile traces.

    from kernels import attention, decode_attention, layer_norm, add_layer_norm, rms_norm, add_rms_norm, gelu,
        linear_cross_entropy, rotary

On a CPU, Triton runs them only through its interpreter: set TRITON_INTERPRET=1 before importing triton.
"""
from kernels.attention import attention
from kernels.decode_attention import decode_attention
from kernels.gelu import gelu
from kernels.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.rotary import rotary

__all__ = ["add_layer_norm", "add_rms_norm", "attention", "decode_attention", "gelu", "layer_norm",
           "linear_cross_entropy", "rms_norm", "rotary"]
