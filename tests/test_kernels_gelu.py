"""kernels.gelu against F.gelu in float64, both approximations, with and without the fused bias."""
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE
from kernels import gelu
from kernels.testing import relative_error, tolerance

gelu_module = importlib.import_module("kernels.gelu")  # the module: `kernels.gelu` is the function



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(3, 5, 96), (4, 1000), (2, 3072)], ids=str)
def test_forward_and_gradients(shape, approximate, bias, dtype):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).to(DEVICE)
    x[..., 0], x[..., 1], x[..., 2] = 10.0, -10.0, 0.0  # large |x| and zero
    x.requires_grad_()
    b = torch.randn(shape[-1], dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_() if bias else None
    if bias:
        with torch.no_grad():
            b[:3] = 0.0  # keep the planted values as they are
    y = gelu(x, b, approximate=approximate)
    u = x.double() + (b.double() if bias else 0.0)
    y_ref = F.gelu(u, approximate=approximate)
    tol = tolerance(dtype)
    assert y.dtype == dtype
    assert relative_error(y, y_ref) <= tol
    flat = y.detach().double().reshape(-1, shape[-1])
    assert flat[:, 0].sub(10.0).abs().max() <= 10 * tol and flat[:, 1].abs().max() <= tol and (flat[:, 2] == 0).all()
    dy = torch.randn_like(y)
    inputs = [x] + ([b] if bias else [])
    for g, g_ref in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, inputs, dy.double())):
        assert relative_error(g, g_ref) <= tolerance(dtype, reduction=True)


@pytest.mark.parametrize("tiles", ["interpreter_tiles", "gpu_tiles"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(37, 1000), (5, 3000), (300, 96)], ids=str)
def test_fused_dbias_under_both_tilings(shape, approximate, tiles, monkeypatch):
    """The backward's dbias partial sums over row runs and column blocks, under the interpreter's wide tiles and the
    GPU's small ones (several column blocks, many row groups, tails in both directions); fp32 bias with fp16
    activations, as under autocast."""
    if tiles == "gpu_tiles":
        monkeypatch.setattr(gelu_module, "launch_config", functools.partial(gelu_module.launch_config, interpreter=False))
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float16, device=DEVICE, requires_grad=True)
    b = torch.randn(shape[-1], dtype=torch.float32, device=DEVICE, requires_grad=True)
    y = gelu(x, b, approximate)
    y_ref = F.gelu(x.double() + b.double(), approximate=approximate)
    assert relative_error(y, y_ref) <= tolerance(torch.float16)
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    dx_ref, db_ref = torch.autograd.grad(y_ref, (x, b), dy.double())
    assert db.dtype == torch.float32 and dx.dtype == torch.float16
    assert relative_error(dx, dx_ref) <= tolerance(torch.float16, reduction=True)
    assert relative_error(db, db_ref) <= tolerance(torch.float16, reduction=True)


def test_non_contiguous_input():
    x = torch.randn(64, 32, device=DEVICE)
    b = torch.randn(64, device=DEVICE)
    xt = x.t()
    torch.testing.assert_close(gelu(xt, b), gelu(xt.contiguous(), b), rtol=0, atol=0)


def test_bad_input_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="gelu: x has dtype torch.int32; supported"):
        gelu(torch.ones(4, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"gelu: bias has shape \(4,\), expected \(8,\)"):
        gelu(x, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="gelu: approximate='fast'; choose 'none' \\(erf\\) or 'tanh'"):
        gelu(x, approximate="fast")
    with pytest.raises(ValueError, match="at least one dimension"):
        gelu(torch.tensor(1.0))
