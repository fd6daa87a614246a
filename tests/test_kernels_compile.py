"""The kernels are torch.library custom ops: opcheck passes and torch.compile(fullgraph=True) traces them."""
import pytest
import torch
import torch.nn as nn

from helpers import DEVICE
from kernels import add_layer_norm, attention, gelu, layer_norm
from kernels.attention import _attention_fwd_op
from kernels.gelu import _gelu_fwd_op
from kernels.layer_norm import _layer_norm_fwd_op


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE, requires_grad=True)


OPCHECK_CASES = [
    ("layer_norm", _layer_norm_fwd_op, lambda: (r(3, 5, 64), None, r(64), r(64), 1e-5, None)),
    ("layer_norm_nobias", _layer_norm_fwd_op, lambda: (r(4, 100), None, r(100), None, 1e-5, None)),
    ("add_layer_norm", _layer_norm_fwd_op, lambda: (r(3, 5, 96), r(3, 5, 96), r(96), r(96), 1e-5, None)),
    # the autocast case: a float32 stream plus a half branch output, normalized into half
    ("add_layer_norm_mixed", _layer_norm_fwd_op, lambda: (r(4, 100), r(4, 100, dtype=torch.float16), r(100), None,
                                                          1e-5, torch.float16)),
    ("rms_norm", _layer_norm_fwd_op, lambda: (r(3, 5, 64), None, r(64), None, 1e-6, None, True)),
    ("add_rms_norm", _layer_norm_fwd_op, lambda: (r(4, 100), r(4, 100), r(100), None, 1e-6, None, True)),
    ("gelu", _gelu_fwd_op, lambda: (r(4, 96), r(96), "none")),
    ("gelu_tanh", _gelu_fwd_op, lambda: (r(2, 3, 32), None, "tanh")),
    # (q, k, v, causal, dropout_p, scale, softcap (0: none), window left, right (-1: unbounded))
    ("attention", _attention_fwd_op, lambda: (r(1, 2, 20, 32), r(1, 2, 20, 32), r(1, 2, 20, 32), True, 0.0, 0.2,
                                              0.0, -1, -1)),
    ("attention_full", _attention_fwd_op, lambda: (r(2, 1, 9, 16), r(2, 1, 9, 16), r(2, 1, 9, 16), False, 0.0,
                                                   0.25, 0.0, -1, -1)),
    ("attention_gqa_options", _attention_fwd_op, lambda: (r(1, 4, 12, 32), r(1, 2, 20, 32), r(1, 2, 20, 32), True,
                                                          0.0, 0.2, 5.0, 6, -1)),
]


@pytest.mark.parametrize("name,op,make_args", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(name, op, make_args):
    torch.library.opcheck(op, make_args())


class TinyBlock(nn.Module):
    """A pre-LN transformer block built only from the three kernels."""

    def __init__(self, C=64, H=2):
        super().__init__()
        self.H = H
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))
        self.qkv = nn.Linear(C, 3 * C)
        self.fc = nn.Linear(C, 4 * C)
        self.proj = nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        h = layer_norm(x, self.ln_w, self.ln_b)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in self.qkv(h).split(C, dim=2))
        x = x + attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        h = layer_norm(x, self.ln_w, None)
        return x + self.proj(gelu(nn.functional.linear(h, self.fc.weight), self.fc.bias))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    block = TinyBlock().to(DEVICE)
    x = torch.randn(2, 24, 64, device=DEVICE)
    eager = block(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(block.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # no C++ build: fast on 2 cores
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(block.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_follows_autocast():
    """The autocast dtype is read in the Python wrapper, outside the custom op: a compiled graph writes the
    normalized output in it under autocast (guarded: the same function recompiles without autocast)."""
    def fused(x, residual, w, b):
        h, y = add_layer_norm(x, residual, w, b)
        return h, y, layer_norm(h, w, b)

    x = torch.randn(4, 96, device=DEVICE, requires_grad=True)
    residual = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16)
    w, b = torch.ones(96, device=DEVICE, requires_grad=True), torch.zeros(96, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, eager = compiled(x, residual, w, b), fused(x, residual, w, b)
    assert [t.dtype for t in out] == [torch.float32, torch.bfloat16, torch.bfloat16]
    for a, e in zip(out, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert [t.dtype for t in compiled(x, residual, w, b)] == [torch.float32] * 3
    out[1].float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad is not None


def test_compile_inductor_fullgraph_on_the_gpt():
    """The whole GPT with attn=triton under the default inductor backend, fullgraph: no graph breaks.

    Inductor's on-disk caches are off here: their keys do not cover a custom op's schema, so a graph compiled
    against an older signature of one of our ops (same name, other outputs) would be loaded and fail."""
    from nanogpt.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=32, attn="triton")).to(DEVICE)
    idx = torch.randint(0, 50, (2, 16), device=DEVICE)
    eager_logits, eager_loss = model(idx, idx)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        logits, loss = compiled(idx, idx)
        loss.backward()
    assert logits is None and eager_logits is None  # with targets, the fused loss head builds no logits
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
