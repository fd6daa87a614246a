"""kernels.linear_cross_entropy against F.cross_entropy(x @ W^T) in float64: loss, dx, dW.

Awkward shapes (V no multiple of any block, N = 1, rows past a block), ignored rows, all rows ignored, large
logits, the options (label smoothing, z-loss, softcap, class weights) alone and together, every shipped launch
config, several vocabulary splits and backward chunks, through both load paths (TMA
tensor descriptors, which sm_90 takes for fp16/bf16, and masked pointers); the custom op's opcheck,
torch.compile(fullgraph=True), autocast, and the GPT with attn=triton against naive.
"""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import DEVICE
from kernels import linear_cross_entropy
from kernels.linear_cross_entropy import CONFIGS, _backward, _forward, _linear_cross_entropy_fwd_op
from kernels.testing import relative_error, tolerance

lce_module = importlib.import_module("kernels.linear_cross_entropy")  # `kernels.linear_cross_entropy`: the function

INTERPRETED = DEVICE == "cpu"
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
              INTERPRETED, reason="Triton's interpreter cannot run tl.dot on bfloat16 (triton #11584): GPU only"))]


def make_inputs(N, C, V, dtype, scale=1.0, ignored=(), seed=0):
    """x, W with logits of standard deviation about `scale`; targets with the rows in `ignored` set to -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64) * (scale / C ** 0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignored)] = -1
    return x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), targets.to(DEVICE)


def reference(x, w, targets, reduction="mean", grad=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
              class_weight=None):
    """loss, dx, dW of F.cross_entropy(x @ w^T) in float64, from the same (rounded) inputs; with the options, the
    logits capped first (softcap * tanh(s / softcap)), F.cross_entropy's label_smoothing and weight, and the
    z-loss z_loss * logsumexp^2 per counted row added ("mean": over the counted rows)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    logits = x64 @ w64.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction, label_smoothing=label_smoothing,
                           weight=None if class_weight is None else class_weight.double())
    counted = targets != -1
    z = torch.where(counted, z_loss * torch.logsumexp(logits, dim=1) ** 2, 0.0)
    loss = loss + {"none": z, "sum": z.sum(), "mean": z.sum() / counted.sum().clamp_min(1)}[reduction]
    loss.backward(grad.double() if grad is not None else None)
    return loss.detach(), x64.grad, w64.grad


def check(actual, expected, tol, what):
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,C,V,scale,ignored", [
    (1, 32, 1003, 1.0, ()),                  # one row; V no multiple of any block
    (37, 80, 1003, 1.0, (0, 5, 36)),         # ignored rows, C no multiple of BLOCK_K
    (150, 48, 517, 30.0, (3, 149)),          # large logits; rows past a 128-row block
], ids=["N1", "ignored", "scale30"])
def test_matches_float64_reference(N, C, V, scale, ignored, reduction, dtype):
    x, w, targets = make_inputs(N, C, V, dtype, scale, ignored)
    x.requires_grad_()
    w.requires_grad_()
    grad = torch.randn(N, dtype=torch.float32, device=DEVICE) if reduction == "none" else None
    loss = linear_cross_entropy(x, w, targets, reduction=reduction)
    loss.backward(grad)
    loss_ref, dx_ref, dw_ref = reference(x, w, targets, reduction, grad)
    tol = tolerance(dtype, "loss_head")
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    check(loss, loss_ref, tol, "loss")
    check(x.grad, dx_ref, tol, "dx")
    check(w.grad, dw_ref, tol, "dW")
    if ignored:
        assert (x.grad[list(ignored)] == 0).all()


# the loss head's options, alone and together (Liger-Kernel's grid): label smoothing, PaLM's z-loss (large enough
# here to move the gradients visibly), Gemma's softcap (at 2.0 it flattens logits of scale 5), class weights
OPTIONS = {
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=2.0),
    "softcap_loose": dict(softcap=50.0),
    "weights": dict(class_weight="random"),
    "smoothing+weights": dict(label_smoothing=0.1, class_weight="random"),
    "all": dict(label_smoothing=0.1, z_loss=0.05, softcap=2.0, class_weight="random"),
}


def _options(name, V, dtype=torch.float32):
    options = dict(OPTIONS[name])
    if options.get("class_weight") == "random":  # weights in [0.25, 2.25), one class weighted 0
        weights = 0.25 + 2 * torch.rand(V, generator=torch.Generator().manual_seed(1))
        weights[3] = 0.0
        options["class_weight"] = weights.to(dtype).to(DEVICE)
    return options


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option,dtype", [(name, torch.float32) for name in OPTIONS] + [("all", torch.float16)],
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else v)
def test_options_match_float64_reference(option, dtype, reduction):
    """Each option (and all at once) against float64 F.cross_entropy with the same semantics: odd N and V, ignored
    rows, logits of scale 5 (where a softcap of 2 bites)."""
    N, C, V = 37, 80, 517
    x, w, targets = make_inputs(N, C, V, dtype, 5.0, ignored=(0, 5, 36))
    targets[7] = 3  # a row whose target has weight 0
    options = _options(option, V)
    x.requires_grad_()
    w.requires_grad_()
    grad = torch.randn(N, dtype=torch.float32, device=DEVICE) if reduction == "none" else None
    loss = linear_cross_entropy(x, w, targets, reduction=reduction, **options)
    loss.backward(grad)
    loss_ref, dx_ref, dw_ref = reference(x, w, targets, reduction, grad, **options)
    tol = tolerance(dtype, "loss_head")
    check(loss, loss_ref, tol, "loss")
    check(x.grad, dx_ref, tol, "dx")
    check(w.grad, dw_ref, tol, "dW")
    assert (x.grad[[0, 5, 36]] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_z_loss_gives_the_term_alone_detached(reduction):
    x, w, targets = make_inputs(29, 32, 300, torch.float32, ignored=(2, 3))
    x.requires_grad_()
    loss, z = linear_cross_entropy(x, w, targets, reduction=reduction, z_loss=1e-2, return_z_loss=True)
    plain = linear_cross_entropy(x, w, targets, reduction=reduction)
    lse = torch.logsumexp(x.detach().double() @ w.double().t(), dim=1)
    expected = torch.where(targets != -1, 1e-2 * lse ** 2, 0.0)
    if reduction == "mean":
        expected = expected.sum() / 27
    check(z, expected, 1e-5, "z")
    check(loss - z, plain, 1e-5, "loss without the z term")
    assert not z.requires_grad and loss.requires_grad
    zero_z = linear_cross_entropy(x, w, targets, return_z_loss=True)[1]
    assert zero_z.item() == 0.0  # z_loss=0: the term is 0, the loss the plain one


def force_path(monkeypatch, tma):
    """Launch the TMA (tensor-descriptor) path or the pointer path whatever the device (the interpreter runs
    descriptors in fp32 and fp16); returns the list of the dtypes the launches asked for a path with."""
    calls = []

    def tma_path(x, weight):
        calls.append(x.dtype)
        return tma

    monkeypatch.setattr(lce_module, "_tma_path", tma_path)
    return calls


def _config_cases():
    for dtype in (torch.float32, torch.float16):
        fp32 = dtype == torch.float32
        for index in range(max(len(CONFIGS["fwd", fp32]), len(CONFIGS["dlogits", fp32]))):
            # fp32 ships on the pointer path only (see _tma_path); fp16/bf16 take TMA on sm_90, pointers on sm_80
            for path in ("pointer",) if fp32 else ("pointer", "tma"):
                yield pytest.param(dtype, index, path, id=f"{str(dtype)[6:]}-{index}-{path}")


@pytest.mark.parametrize("options", ["plain", "all"])
@pytest.mark.parametrize("dtype,index,path", list(_config_cases()))
def test_every_shipped_config(dtype, index, path, options, monkeypatch):
    """Each launch config of both kernels for this dtype (as the GPU's autotuner may pick it), on each load path it
    ships on, with 3 vocabulary splits in the forward and 256-column chunks in the backward (dx summed over 4
    chunks, the last one partial); the plain loss, and every option on (each is a compile-time branch)."""
    calls = force_path(monkeypatch, path == "tma")
    fwd_configs, dlogits_configs = CONFIGS["fwd", dtype == torch.float32], CONFIGS["dlogits", dtype == torch.float32]
    fwd_config = fwd_configs[index % len(fwd_configs)]
    dlogits_config = dlogits_configs[index % len(dlogits_configs)]
    x, w, targets = make_inputs(131, 72, 1003, dtype, 5.0, ignored=(7, 130))
    extra = {} if options == "plain" else _options("all", 1003)
    if extra:
        extra["class_weight"] = extra["class_weight"].float()  # as linear_cross_entropy passes it
    loss, _, lse = _forward(x, w, targets, -1, "sum", config=fwd_config, splits=3, **extra)
    grad = torch.tensor(0.7, device=DEVICE)
    dx, dw = _backward(grad, x, w, targets, lse, -1, "sum", config=dlogits_config, chunk=256, **extra)
    loss_ref, dx_ref, dw_ref = reference(x, w, targets, "sum", grad, **extra)
    tol = tolerance(dtype, "loss_head")
    check(loss, loss_ref, tol, "loss")
    check(dx, dx_ref, tol, "dx")
    check(dw, dw_ref, tol, "dW")
    assert calls == [dtype, dtype]  # the forward and the backward asked, and took the forced path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("N,C,V", [
    (1, 32, 1003),      # one row; V no multiple of any block: the descriptor zero-fills W's rows past V
    (37, 80, 517),      # odd N, rows past the block zero-filled; C no multiple of BLOCK_K: zeros past C
    (131, 72, 300),     # rows past a 128-row block
], ids=["N1", "N37", "N131"])
def test_tensor_descriptor_path(N, C, V, dtype, monkeypatch):
    """The TMA path at awkward shapes, forward and backward (several chunks), against float64."""
    calls = force_path(monkeypatch, True)
    x, w, targets = make_inputs(N, C, V, dtype, 3.0, ignored=(0,) if N > 1 else ())
    loss, _, lse = _forward(x, w, targets, -1, "sum", splits=2)
    grad = torch.tensor(1.3, device=DEVICE)
    dx, dw = _backward(grad, x, w, targets, lse, -1, "sum", chunk=256)
    loss_ref, dx_ref, dw_ref = reference(x, w, targets, "sum", grad)
    tol = tolerance(dtype, "loss_head")
    check(loss, loss_ref, tol, "loss")
    check(dx, dx_ref, tol, "dx")
    check(dw, dw_ref, tol, "dW")
    assert calls == [dtype, dtype]


def test_fp32_and_cpu_tensors_take_the_pointer_path():
    """fp32 never takes the descriptor path (it spills on sm_90), nor does a tensor off a GPU."""
    x, w, _ = make_inputs(4, 16, 40, torch.float32)
    assert lce_module._tma_path(x, w) is False
    if DEVICE == "cpu":
        x, w, _ = make_inputs(4, 16, 40, torch.float16)
        assert lce_module._tma_path(x, w) is False


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(reduction):
    x, w, targets = make_inputs(9, 32, 300, torch.float32, ignored=range(9))
    x.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(x, w, targets, reduction=reduction)
    loss.sum().backward()
    assert (loss == 0).all()
    assert (x.grad == 0).all() and (w.grad == 0).all()


def test_other_ignore_index_and_leading_dims():
    """A (B, T, C) input with (B, T) targets, and ignore_index a valid class id (as the row's target)."""
    x, w, targets = make_inputs(24, 32, 300, torch.float32)
    targets[[1, 2]] = 7
    loss = linear_cross_entropy(x.view(4, 6, 32), w, targets.view(4, 6), ignore_index=7)
    expected = F.cross_entropy(x.double() @ w.double().t(), targets, ignore_index=7)
    check(loss, expected, tolerance(torch.float32, "loss_head"), "loss")
    rows = linear_cross_entropy(x.view(4, 6, 32), w, targets.view(4, 6), ignore_index=7, reduction="none")
    assert rows.shape == (4, 6) and rows.view(-1)[1] == 0


def test_autocast_casts_x_and_weight_like_f_linear():
    """Under autocast, fp32 x and weight are cast to the autocast dtype (fp16 here: the interpreter's dots run it),
    the loss matches F.cross_entropy(F.linear) under the same autocast, and the gradients come back in fp32."""
    x, w, targets = make_inputs(20, 48, 300, torch.float32, ignored=(4,))
    x.requires_grad_()
    w.requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = linear_cross_entropy(x, w, targets)
    loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    loss_ref, dx_ref, dw_ref = reference(x.half(), w.half(), targets)
    tol = tolerance(torch.float16, "loss_head")
    check(loss, loss_ref, tol, "loss")
    check(x.grad, dx_ref, tol, "dx")
    check(w.grad, dw_ref, tol, "dW")


def test_out_of_range_target():
    x, w, targets = make_inputs(5, 16, 40, torch.float32)
    targets[2] = 40
    with pytest.raises(ValueError, match=r"linear_cross_entropy: target 40 is outside \[0, 40\) and is not "
                                         r"ignore_index=-1"):
        linear_cross_entropy(x, w, targets)
    # where no eager check runs (a GPU, or compiled), the row's loss is NaN: the trainer stops on it
    loss, _, _ = _forward(x, w, targets, -1, "none")
    assert loss[2].isnan() and loss[[0, 1, 3, 4]].isfinite().all()


def test_bad_input_errors():
    x, w, targets = make_inputs(4, 16, 40, torch.float32)
    with pytest.raises(ValueError, match=r"x \(4, 16\) and weight \(40, 8\) do not match"):
        linear_cross_entropy(x, w[:, :8], targets)
    with pytest.raises(ValueError, match=r"targets has shape \(3,\), expected \(4,\)"):
        linear_cross_entropy(x, w, targets[:3])
    with pytest.raises(TypeError, match="targets has dtype torch.int32; expected torch.int64"):
        linear_cross_entropy(x, w, targets.int())
    with pytest.raises(ValueError, match="reduction='avg'; choose one of mean, sum, none"):
        linear_cross_entropy(x, w, targets, reduction="avg")
    with pytest.raises(TypeError, match="x is torch.float32 but weight is torch.float16"):
        linear_cross_entropy(x, w.half(), targets)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        linear_cross_entropy(x.long(), w, targets)
    for options, message in (
            (dict(label_smoothing=1.5), r"label_smoothing=1.5; it must be in \[0, 1\]"),
            (dict(z_loss=-1.0), "z_loss=-1.0; it must be a finite number >= 0"),
            (dict(softcap=0.0), "softcap=0.0; it must be a finite number > 0"),
            (dict(class_weight=torch.ones(39)), r"class_weight is \(39,\); expected a tensor of shape \(40,\)"),
            (dict(class_weight=torch.ones(40, dtype=torch.int64)), "class_weight has dtype torch.int64")):
        with pytest.raises((ValueError, TypeError), match=message):
            linear_cross_entropy(x, w, targets, **options)


@pytest.mark.parametrize("reduction,options", [("mean", False), ("none", False), ("mean", True)])
def test_opcheck(reduction, options):
    x, w, targets = make_inputs(19, 32, 300, torch.float32, ignored=(3,))
    extra = (torch.rand(300, device=DEVICE), 0.1, 1e-3, 5.0) if options else (None, 0.0, 0.0, None)
    class_weight, label_smoothing, z_loss, softcap = extra
    torch.library.opcheck(_linear_cross_entropy_fwd_op,
                          (x.requires_grad_(), w.requires_grad_(), targets, class_weight, -1, reduction,
                           label_smoothing, z_loss, softcap))


class TinyHead(nn.Module):
    def __init__(self, C=32, V=300):
        super().__init__()
        self.proj = nn.Linear(C, C)
        self.head = nn.Linear(C, V, bias=False)

    def forward(self, x, targets):
        return linear_cross_entropy(torch.tanh(self.proj(x)), self.head.weight, targets)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyHead().to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE)
    targets = torch.randint(0, 300, (2, 12), device=DEVICE)
    targets[0, :3] = -1
    eager = model(x, targets)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ignored", [False, True], ids=["all-counted", "ignored-rows"])
def test_gpt_with_triton_loss_head_matches_naive(ignored):
    """The whole GPT with attn=triton (fused loss head, no logits) against naive: loss and every gradient, fp32."""
    from nanogpt.model import GPT, GPTConfig
    cfg = dict(block_size=16, vocab_size=1003, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    naive = GPT(GPTConfig(**cfg, attn="naive")).to(DEVICE)
    fused = GPT(GPTConfig(**cfg, attn="triton")).to(DEVICE)
    fused.load_state_dict(naive.state_dict())
    idx = torch.randint(0, 1003, (2, 16), device=DEVICE)
    targets = torch.randint(0, 1003, (2, 16), device=DEVICE)
    if ignored:
        targets[1, 5:] = -1
    logits_n, loss_n = naive(idx, targets)
    logits_f, loss_f = fused(idx, targets)
    assert logits_n.shape == (2, 16, 1003) and logits_f is None  # the fused head never builds the logits
    loss_n.backward()
    loss_f.backward()
    tol = tolerance(torch.float32, "loss_head")
    check(loss_f, loss_n, tol, "loss")
    grads_n = dict(naive.named_parameters())
    for name, p in fused.named_parameters():
        check(p.grad, grads_n[name].grad, tol, name)
