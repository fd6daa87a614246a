"""kernels.rotary against a float64 reference (relative L2 error, per-dtype tolerance)."""
import functools
import importlib

import pytest
import torch

from helpers import DEVICE
from kernels import rotary
from kernels.testing import relative_error, tolerance

rotary_module = importlib.import_module("kernels.rotary")


def reference(x, positions, base=10000.0):
    """RoPE in float64, written from the definition: pairs (i, i + D/2) rotated by position * base^(-2i/D)."""
    B, H, T, D = x.shape
    half = D // 2
    inv_freq = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    pos = positions.double().expand(B, T) if positions.dim() == 1 else positions.double()
    angle = pos[:, None, :, None] * inv_freq  # (B, 1, T, half)
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)


@pytest.fixture(params=["interpreter_tiles", "gpu_tiles"])
def tiles(request, monkeypatch):
    """The interpreter's wide tiles or a GPU's (fewer positions per program: many programs and a tail)."""
    if request.param == "gpu_tiles":
        monkeypatch.setattr(rotary_module, "launch_config",
                            functools.partial(rotary_module.launch_config, interpreter=False))
    return request.param


def make(B, H, T, D, dtype, strided):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    if strided:  # the model's view: (B, T, 3 heads' worth, D) -> one head group, transposed
        x = torch.randn(B, T, 3 * H, D, generator=g)[:, :, H:2 * H].transpose(1, 2)
    else:
        x = torch.randn(B, H, T, D, generator=g)
    return x.to(dtype).to(DEVICE).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 16), (2, 3, 7, 64), (1, 2, 113, 80), (2, 1, 33, 256)], ids=str)
def test_forward_and_gradient(B, H, T, D, dtype, tiles):
    x = make(B, H, T, D, dtype, strided=True)
    positions = torch.arange(T, device=DEVICE)
    y = rotary(x, positions)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    y_ref = reference(x, positions)
    assert relative_error(y, y_ref) <= tolerance(dtype)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy.double())
    assert dx.dtype == dtype and relative_error(dx, dx_ref) <= tolerance(dtype)


def test_per_row_positions_and_base(tiles):
    """Ragged positions per row (decoding from a KV cache: row b's new tokens sit at lengths[b] - T + i), large
    positions, and another base."""
    x = make(3, 2, 4, 32, torch.float32, strided=False)
    positions = torch.tensor([[0, 1, 2, 3], [9, 10, 11, 12], [500, 501, 502, 503]], device=DEVICE)
    for base in (10000.0, 500.0):
        assert relative_error(rotary(x, positions, base), reference(x, positions, base)) <= tolerance(torch.float32)


def test_rotation_keeps_norms_and_inverts():
    """A rotation: each pair's norm is kept, position 0 is the identity, and the backward (the inverse rotation)
    undoes the forward."""
    x = make(2, 2, 9, 64, torch.float32, strided=False).detach()
    positions = torch.arange(9, device=DEVICE)
    y = rotary(x, positions)
    pair_norm = lambda t: t[..., :32] ** 2 + t[..., 32:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0], rtol=0, atol=0)
    back = rotary_module._rotary_op(y, positions.to(torch.int32).expand(2, 9), 10000.0, True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x = torch.randn(2, 3, 5, 16, device=DEVICE, requires_grad=True)
    positions = torch.arange(5, device=DEVICE, dtype=torch.int32).expand(2, 5)
    torch.library.opcheck(rotary_module._rotary_op, (x, positions, 10000.0, False))


@pytest.mark.parametrize("args, error, message", [
    (((2, 3, 5, 15), (5,)), ValueError, "rotary: the head dim D=15 must be even"),
    (((2, 3, 5, 16), (4,)), ValueError, r"rotary: positions has shape \(4,\), expected \(5,\) or \(2, 5\)"),
    (((2, 3, 5, 16), (3, 5)), ValueError, r"rotary: positions has shape \(3, 5\)"),
    (((3, 5, 16), (5,)), ValueError, r"rotary: x must be a 4-d tensor \(B, H, T, D\)"),
])
def test_bad_input_errors(args, error, message):
    shape, pos_shape = args
    with pytest.raises(error, match=message):
        rotary(torch.randn(shape, device=DEVICE), torch.zeros(pos_shape, dtype=torch.long, device=DEVICE))


def test_bad_positions_and_base():
    x = torch.randn(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="rotary: positions must be an integer tensor"):
        rotary(x, torch.arange(4.0, device=DEVICE))
    with pytest.raises(ValueError, match="rotary: base=1.0 must be > 1"):
        rotary(x, torch.arange(4, device=DEVICE), base=1.0)
    with pytest.raises(TypeError, match="rotary: x has dtype torch.int64"):
        rotary(torch.ones(1, 1, 4, 8, dtype=torch.long, device=DEVICE), torch.arange(4, device=DEVICE))
