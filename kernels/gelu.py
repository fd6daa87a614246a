"""GELU with an optional fused bias add, forward and backward, in Triton.

    exact: y = 0.5 * u * (1 + erf(u / sqrt(2)))                        u = x + bias
    tanh:  y = 0.5 * u * (1 + tanh(sqrt(2/pi) * (u + 0.044715 u^3)))

The MLP computes c_fc without its bias and hands the bias here, so bias + GELU is one read of x and one
write of y instead of two passes over the (B, T, 4C) activation. Backward reads x (and bias) and dy, writes
du; dbias is du summed over the rows, in fp32.
"""
import torch
import triton
import triton.language as tl

from kernels._common import check_device, check_float, interpreting

APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _tanh(z):
    # (1 - e) / (1 + e) with e = exp(-2|z|) <= 1: never overflows, exact limits +-1 for large |z|
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _gelu_fwd(X, Bias, Y, numel, N, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(Bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        y = 0.5 * u * (1.0 + _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))
    else:
        y = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd(DY, X, Bias, DX, numel, N, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(Bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        t = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        dgelu = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
    else:
        # d/du [u * Phi(u)] = Phi(u) + u * phi(u)
        dgelu = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)
    tl.store(DX + offs, (dy * dgelu).to(DX.dtype.element_ty), mask=mask)


# elements per program and warps, on a GPU; under the interpreter every program costs Python time, and wide numpy
# tiles cost little, so a program takes INTERPRETER_BLOCK elements there
LAUNCH_CONFIG = dict(BLOCK=1024, num_warps=4)
INTERPRETER_BLOCK = 65536


def launch_config(interpreter: bool | None = None) -> dict:
    if interpreter is None:
        interpreter = interpreting()
    return {**LAUNCH_CONFIG, "BLOCK": INTERPRETER_BLOCK} if interpreter else dict(LAUNCH_CONFIG)


def _grid(numel, launch):
    return (triton.cdiv(numel, launch["BLOCK"]),)


@torch.library.custom_op("nanogpt_kernels::gelu_fwd", mutates_args=())
def _gelu_fwd_op(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        launch = launch_config()
        _gelu_fwd[_grid(x.numel(), launch)](x, bias if bias is not None else x, y, x.numel(), x.shape[-1],
                                            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", **launch)
    return y


@_gelu_fwd_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanogpt_kernels::gelu_bwd", mutates_args=())
def _gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    x = x.contiguous()
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    if x.numel():
        launch = launch_config()
        _gelu_bwd[_grid(x.numel(), launch)](dy, x, bias if bias is not None else x, dx, x.numel(), x.shape[-1],
                                            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", **launch)
    return dx


@_gelu_bwd_op.register_fake
def _(dy, x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx = _gelu_bwd_op(dy, x, bias, ctx.approximate)
    dbias = None
    if bias is not None:
        dbias = dx.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
    return dx, dbias, None


_gelu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """GELU(x + bias), like F.gelu(x + bias, approximate=approximate), in one pass over memory.

    bias, if given, has shape (x.shape[-1],) and is broadcast over the rows. float32, float16 or bfloat16,
    fp32 arithmetic inside, output in x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("gelu: x must be a tensor with at least one dimension")
    check_float("gelu", "x", x)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"gelu: approximate={approximate!r}; choose 'none' (erf) or 'tanh'")
    if bias is not None:
        check_float("gelu", "bias", bias)
        if bias.shape != (x.shape[-1],):
            raise ValueError(f"gelu: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},) to match x's "
                             f"last dimension")
    check_device("gelu", x, bias)
    return _gelu_fwd_op(x, bias, approximate)


# ------------------------------------------------------------------------------------------------
# what `python -m kernels.inspect` compiles (the contract is described at the top of kernels/inspect.py)

# (x dtype, bias dtype): under autocast c_fc's output is bfloat16 and its bias a float32 parameter; float32 training
INSPECT_DTYPES = [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]
INSPECT_WIDTHS = (768, 1600, 3072)


def inspect_cases():
    """Forward and backward, exact and tanh, at GPT-2 widths over 16K rows."""
    from kernels.inspect import launch_case
    M = 16 * 1024
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    cases = []
    for dtype, bias_dtype in INSPECT_DTYPES:
        for N in INSPECT_WIDTHS:
            for approximate in APPROXIMATIONS:
                problem = {"dtype": names[dtype], "width": N, "approximate": approximate}
                flags = dict(numel=M * N, N=N, HAS_BIAS=True, APPROX_TANH=approximate == "tanh")
                launch = launch_config(interpreter=False)
                cases.append(launch_case("gelu_fwd", _gelu_fwd, launch, problem,
                                         dict(X=dtype, Bias=bias_dtype, Y=dtype, **flags)))
                cases.append(launch_case("gelu_bwd", _gelu_bwd, launch, problem,
                                         dict(DY=dtype, X=dtype, Bias=bias_dtype, DX=dtype, **flags)))
    return cases
