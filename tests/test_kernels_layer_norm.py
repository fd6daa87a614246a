"""kernels.layer_norm and kernels.rms_norm against float64 references (relative L2 error, per-dtype tolerance)."""
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE
from kernels import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from kernels.testing import relative_error, tolerance

layer_norm_module = importlib.import_module("kernels.layer_norm")  # the module: `kernels.layer_norm` is the function

SHAPES = [(1, 1, 768), (3, 7, 768), (2, 5, 1600), (4, 100), (2, 3, 1000), (1, 8192)]


def reference(x, w, b, eps=1e-5):
    return F.layer_norm(x.double(), (x.shape[-1],), w.double(), None if b is None else b.double(), eps)


def make(shape, dtype, bias, mean=0.0):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape, dtype=torch.float64) + mean).to(dtype).to(DEVICE).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], dtype=torch.float64)).to(dtype).to(DEVICE).requires_grad_()
    b = (0.1 * torch.randn(shape[-1], dtype=torch.float64)).to(dtype).to(DEVICE).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients(shape, dtype, bias):
    x, w, b = make(shape, dtype, bias)
    y = layer_norm(x, w, b)
    assert y.dtype == dtype and y.shape == x.shape
    y_ref = reference(x, w, b)
    tol = tolerance(dtype)
    assert relative_error(y, y_ref) <= tol
    dy = torch.randn_like(y)
    inputs = [x, w] + ([b] if bias else [])
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy.double())
    for name, g, g_ref in zip(["dx", "dweight", "dbias"], grads, grads_ref):
        assert g.dtype == dtype
        assert relative_error(g, g_ref) <= tolerance(dtype, reduction=True), name  # gradients sum many rounded terms


@pytest.fixture(params=["interpreter_tiles", "gpu_tiles"])
def tiles(request, monkeypatch):
    """The launch parameters the interpreter picks (wide tiles, fast there) or those a GPU runs (small tiles, many
    loop steps and programs, tails): the kernels' masks and loops are checked under both."""
    if request.param == "gpu_tiles":
        monkeypatch.setattr(layer_norm_module, "launch_config",
                            functools.partial(layer_norm_module.launch_config, interpreter=False))
    return request.param


def add_reference(x, residual, w, b, eps=1e-5):
    """h = x + residual rounded to the stream's dtype (as stored), y = LayerNorm(h), both in float64."""
    stream = torch.promote_types(x.dtype, residual.dtype)
    h = x.double() + residual.double()
    h_stored = h + (h.to(stream).double() - h).detach()  # the rounding, with the gradient of the identity
    return h, reference(h_stored, w, b, eps)


ADD_CASES = [(shape, dtype, bias) for shape in [(3, 7, 768), (37, 100), (2, 3, 1000), (9, 1600)]
             for dtype in (torch.float32, torch.float16, torch.bfloat16) for bias in (True, False)
             if bias or dtype == torch.float32]


@pytest.mark.parametrize("shape,dtype,bias", ADD_CASES, ids=str)
def test_add_layer_norm_both_outputs_and_gradients(shape, dtype, bias, tiles):
    x, w, b = make(shape, dtype, bias)
    residual = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    h, y = add_layer_norm(x, residual, w, b)
    h_ref, y_ref = add_reference(x, residual, w, b)
    tol = tolerance(dtype)
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == x.shape
    assert relative_error(h, h_ref) <= tol and relative_error(y, y_ref) <= tol
    # gradients through both outputs: y's (the LayerNorm) and h's (the stream's skip path), added in one pass
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    inputs = [x, residual, w] + ([b] if bias else [])
    grads = torch.autograd.grad((y, h), inputs, (dy, dh))
    grads_ref = torch.autograd.grad((y_ref, h_ref), inputs, (dy.double(), dh.double()))
    for name, g, g_ref in zip(["dx", "dresidual", "dweight", "dbias"], grads, grads_ref):
        assert g.dtype == dtype
        assert relative_error(g, g_ref) <= tolerance(dtype, reduction=True), name


def test_add_layer_norm_with_only_the_normalized_output_used(tiles):
    x, w, b = make((5, 300), torch.float32, True)
    residual = torch.randn_like(x).requires_grad_()
    _, y = add_layer_norm(x, residual, w, b)
    _, y_ref = add_reference(x, residual, w, b)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, residual, w, b), dy),
                        torch.autograd.grad(y_ref, (x, residual, w, b), dy.double())):
        assert relative_error(g, g_ref) <= tolerance(torch.float32, reduction=True)


def test_gpu_tiles_forward_and_backward(tiles):
    """layer_norm (no residual) under both tilings, with more rows than one backward program takes."""
    x, w, b = make((203, 768), torch.float32, True)
    y = layer_norm(x, w, b)
    y_ref = reference(x, w, b)
    assert relative_error(y, y_ref) <= tolerance(torch.float32)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy.double())):
        assert relative_error(g, g_ref) <= tolerance(torch.float32, reduction=True)


def test_autocast_writes_the_normalized_output_in_the_autocast_dtype():
    """Under autocast the stream stays float32 and the branch outputs are half: h keeps the stream's dtype and
    y comes out in the autocast dtype, ready for the next matmul; gradients return in each input's dtype."""
    x, w, b = make((6, 768), torch.float32, True)
    residual = torch.randn(6, 768, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        h, y = add_layer_norm(x, residual, w, b)
        y_plain = layer_norm(x, w, b)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16 and y_plain.dtype == torch.bfloat16
    h_ref, y_ref = add_reference(x, residual, w, b)
    assert relative_error(h, h_ref) <= tolerance(torch.float32)
    assert relative_error(y, y_ref) <= tolerance(torch.bfloat16)
    assert relative_error(y_plain, reference(x, w, b)) <= tolerance(torch.bfloat16)
    (y.float().square().sum() + h.sum()).backward()
    assert x.grad.dtype == torch.float32 and residual.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(residual.grad, x.grad.to(torch.bfloat16), rtol=0, atol=0)


def test_large_mean_keeps_accuracy():
    """1000 + N(0, 1) in float32: E[x^2] - E[x]^2 would cancel catastrophically (~1e-2 error); the kernel's
    variance of (x - mean) stays as accurate as PyTorch's own float32 LayerNorm (~3e-5: the rounding of x
    and of the mean at 1000)."""
    x, w, b = make((4, 768), torch.float32, True, mean=1000.0)
    y = layer_norm(x, w, b)
    y_ref = reference(x, w, b)
    torch_fp32_error = relative_error(F.layer_norm(x, (768,), w, b), y_ref)
    assert relative_error(y, y_ref) <= max(2 * torch_fp32_error, 1e-6) and relative_error(y, y_ref) <= 1e-4
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy.double())):
        assert relative_error(g, g_ref) <= 1e-4


def test_non_contiguous_input_gives_the_same_result():
    x, w, b = make((6, 768), torch.float32, True)
    xt = x.detach().t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    torch.testing.assert_close(layer_norm(xt, w, b), layer_norm(x, w, b), rtol=0, atol=0)
    transposed = x.detach().reshape(2, 3, 768).transpose(0, 1)
    torch.testing.assert_close(layer_norm(transposed, w, b), layer_norm(transposed.contiguous(), w, b), rtol=0, atol=0)


def test_mixed_precision_input_with_fp32_weights():
    """Under autocast the activations are half while the LayerNorm parameters stay fp32."""
    x, w, b = make((3, 7, 768), torch.float16, True)
    w32, b32 = w.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    y = layer_norm(x, w32, b32)
    assert y.dtype == torch.float16
    assert relative_error(y, reference(x, w32, b32)) <= 2e-3
    y.sum().backward()
    assert w32.grad.dtype == torch.float32 and x.grad.dtype == torch.float16


def test_bad_input_errors():
    x, w, b = make((2, 8), torch.float32, True)
    with pytest.raises(TypeError, match="layer_norm: x has dtype torch.int64; supported: float32, float16, bfloat16"):
        layer_norm(torch.ones(2, 8, dtype=torch.long), w, b)
    with pytest.raises(ValueError, match=r"layer_norm: weight has shape \(7,\), expected \(8,\)"):
        layer_norm(x, w[:7], b)
    with pytest.raises(ValueError, match=r"layer_norm: bias has shape \(9,\), expected \(8,\)"):
        layer_norm(x, w, torch.zeros(9, device=DEVICE))
    with pytest.raises(ValueError, match="layer_norm: x must be a tensor with at least one dimension"):
        layer_norm(torch.tensor(1.0), w, b)
    with pytest.raises(ValueError, match=r"add_layer_norm: residual has shape \(2, 7\), expected x's shape \(2, 8\)"):
        add_layer_norm(x, x[:, :7], w, b)


def rms_reference(x, w, eps):
    return F.rms_norm(x.double(), (x.shape[-1],), w.double(), eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 7, 100), (2, 3, 1000), (1, 8192)], ids=str)
def test_rms_norm_forward_and_gradients(shape, dtype, tiles):
    """RMSNorm against F.rms_norm in float64, eps defaulting to finfo(dtype).eps as there; a large mean is kept
    (RMSNorm does not centre: the test would catch a mean subtracted by mistake)."""
    x, w, _ = make(shape, dtype, False, mean=1.5)
    y = rms_norm(x, w)
    assert y.dtype == dtype and y.shape == x.shape
    y_ref = rms_reference(x, w, torch.finfo(dtype).eps)
    assert relative_error(y, y_ref) <= tolerance(dtype)
    dy = torch.randn_like(y)
    for name, g, g_ref in zip(["dx", "dweight"], torch.autograd.grad(y, (x, w), dy),
                              torch.autograd.grad(y_ref, (x, w), dy.double())):
        assert g.dtype == dtype
        assert relative_error(g, g_ref) <= tolerance(dtype, reduction=True), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_add_rms_norm_both_outputs_and_gradients(dtype, tiles):
    x, w, _ = make((37, 300), dtype, False)
    residual = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    h, y = add_rms_norm(x, residual, w, eps=1e-6)
    h_ref = x.double() + residual.double()
    h_stored = h_ref + (h_ref.to(dtype).double() - h_ref).detach()
    y_ref = rms_reference(h_stored, w, 1e-6)
    assert relative_error(h, h_ref) <= tolerance(dtype) and relative_error(y, y_ref) <= tolerance(dtype)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), (x, residual, w), (dy, dh))
    grads_ref = torch.autograd.grad((y_ref, h_ref), (x, residual, w), (dy.double(), dh.double()))
    for name, g, g_ref in zip(["dx", "dresidual", "dweight"], grads, grads_ref):
        assert relative_error(g, g_ref) <= tolerance(dtype, reduction=True), name


def test_rms_norm_bad_input_errors():
    x, w, _ = make((2, 8), torch.float32, False)
    with pytest.raises(ValueError, match=r"rms_norm: weight has shape \(7,\), expected \(8,\)"):
        rms_norm(x, w[:7])
    with pytest.raises(ValueError, match=r"add_rms_norm: residual has shape \(2, 7\), expected x's shape"):
        add_rms_norm(x, x[:, :7], w)


def test_cpu_without_interpreter_says_how_to_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 in the environment"):
        layer_norm(x, torch.ones(8), None)
