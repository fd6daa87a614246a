"""LayerNorm over the last dimension, forward and backward, in Triton.

    y = (x - mean) * rstd * w + b,   rstd = 1 / sqrt(var + eps),   var the biased variance

Forward: each program holds whole rows in registers (one row when they are wide, a tile of rows when
narrow), computes mean then the variance of (x - mean) in fp32 (two passes over registers: no E[x^2] - E[x]^2 cancellation for rows with a large mean),
writes y and saves mean and rstd for backward.

Backward, with xhat = (x - mean) * rstd and wdy = w * dy:
    dx = rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy))
    dw = sum over rows of dy * xhat,   db = sum over rows of dy
A fixed number of programs each walk a strided set of row tiles, compute dx in the same row pass and keep
their dw/db partial sums in registers; a second small kernel adds the partial sums. No atomics: the result
is deterministic and there is no contention whatever the number of rows.
"""
import torch
import triton
import triton.language as tl

from kernels._common import check_device, check_float, interpreting, num_programs_hint


@triton.jit
def _layer_norm_fwd(X, Y, W, B, Mean, Rstd, stride_x, stride_y, M, N, eps,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # BLOCK_M whole rows per program (1 for wide rows; several for narrow ones, to keep programs busy)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_dx(DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial, stride_dy, stride_x, stride_dx,
                       M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # program p handles row tiles p, p + P, p + 2P, ... and keeps its dw/db partial sums in registers
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), num_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_partial + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _sum_partials(Partial, Out, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[n] = sum over p of Partial[p, n], for a (P, N) fp32 buffer; one program per BLOCK_N columns."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < P) & (cols[None, :] < N)
        acc += tl.load(Partial + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=cols < N)


def _block_n(N: int, element_size: int) -> int:
    block = triton.next_power_of_2(N)
    limit = 65536 // element_size  # the whole row lives in registers
    if block > limit:
        raise ValueError(f"layer_norm: rows of {N} elements are wider than this kernel's limit of {limit} "
                         f"for {element_size}-byte elements")
    return block


def _warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


def _rows_per_program(block_n: int, interpreter: bool | None = None) -> int:
    """Rows per tile: ~4K elements on a GPU (narrow rows share a program), ~64K under the interpreter,
    where each program costs Python time and wide numpy tiles cost little. `interpreter`: which of the two
    (default: where this process runs; `python -m kernels.inspect` asks for the GPU's)."""
    if interpreter is None:
        interpreter = interpreting()
    budget = 65536 if interpreter else 4096
    return max(1, min(128, budget // block_n))


# the reduction of the per-program dw/db partial sums: a fixed launch
SUM_PARTIALS_CONFIG = dict(BLOCK_P=32, BLOCK_N=128, num_warps=4)


def launch_config(N: int, element_size: int, interpreter: bool | None = None) -> dict:
    """The forward's and the backward's (dx) launch parameters for rows of N elements."""
    block_n = _block_n(N, element_size)
    return dict(BLOCK_M=_rows_per_program(block_n, interpreter), BLOCK_N=block_n, num_warps=_warps(block_n))


# ------------------------------------------------------------------------------------------------
# PyTorch custom ops: opaque to torch.compile (traced through their fake implementations), differentiable
# through register_autograd. torch.library.custom_op rather than triton_op: its fake tensors never reach
# the kernel launch, so torch.compile(fullgraph=True) works on the CPU interpreter too.


@torch.library.custom_op("nanogpt_kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        launch = launch_config(N, x.element_size())
        grid = (triton.cdiv(M, launch["BLOCK_M"]),)
        _layer_norm_fwd[grid](x2, y, weight, bias if bias is not None else weight, mean, rstd,
                              x2.stride(0), y.stride(0), M, N, eps, HAS_BIAS=bias is not None, **launch)
    return y.view(x.shape), mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(M, dtype=torch.float32),
            x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("nanogpt_kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    dy2 = dy.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    M = x2.shape[0]
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dw = torch.empty(N, dtype=weight.dtype, device=x.device)
    db = torch.empty(N, dtype=weight.dtype, device=x.device)
    if M == 0:
        return dx.view(x.shape), dw.zero_(), db.zero_()
    launch = launch_config(N, x.element_size())
    programs = max(1, min(triton.cdiv(M, launch["BLOCK_M"]), num_programs_hint(x.device)))
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device) if has_bias else dw_partial
    _layer_norm_bwd_dx[(programs,)](dy2, x2, weight, mean, rstd, dx, dw_partial, db_partial,
                                    dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
                                    HAS_BIAS=has_bias, **launch)
    grid = (triton.cdiv(N, SUM_PARTIALS_CONFIG["BLOCK_N"]),)
    _sum_partials[grid](dw_partial, dw, programs, N, **SUM_PARTIALS_CONFIG)
    if has_bias:
        _sum_partials[grid](db_partial, db, programs, N, **SUM_PARTIALS_CONFIG)
    else:
        db.zero_()
    return dx.view(x.shape), dw, db


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd_op(dy, x, weight, mean, rstd, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x, like F.layer_norm(x, (N,), weight, bias, eps).

    Any leading shape; float32, float16 or bfloat16 in and out with fp32 arithmetic inside; weight and bias
    of shape (N,); bias=None for no bias."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("layer_norm: x must be a tensor with at least one dimension (the one normalized)")
    check_float("layer_norm", "x", x)
    check_float("layer_norm", "weight", weight)
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"layer_norm: weight has shape {tuple(weight.shape)}, expected ({N},) to match x's "
                         f"last dimension")
    if bias is not None:
        check_float("layer_norm", "bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"layer_norm: bias has shape {tuple(bias.shape)}, expected ({N},) to match x's "
                             f"last dimension")
        if bias.dtype != weight.dtype:
            raise TypeError(f"layer_norm: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    check_device("layer_norm", x, weight, bias)
    return _layer_norm_fwd_op(x, weight, bias, float(eps))[0]


# ------------------------------------------------------------------------------------------------
# what `python -m kernels.inspect` compiles (the contract is described at the top of kernels/inspect.py)

# (x dtype, weight dtype): under autocast the residual stream, hence LayerNorm, stays float32; a model cast to
# bfloat16 (sampling) calls it in bfloat16
INSPECT_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
INSPECT_WIDTHS = (768, 1600, 3072)


def inspect_cases():
    """Forward, backward (dx + partial sums) and the partial-sum reduction, at GPT-2's widths (16K rows)."""
    from kernels.inspect import launch_case
    M, programs = 16 * 1024, 132 * 4  # B*T of GPT-2 124M's step; an H100's 132 SMs x num_programs_hint's 4
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    cases = []
    for dtype, wdtype in INSPECT_DTYPES:
        for N in INSPECT_WIDTHS:
            launch = launch_config(N, torch.empty((), dtype=dtype).element_size(), interpreter=False)
            problem = {"dtype": names[dtype], "width": N}
            cases.append(launch_case("layer_norm_fwd", _layer_norm_fwd, launch, problem, dict(
                X=dtype, Y=dtype, W=wdtype, B=wdtype, Mean=torch.float32, Rstd=torch.float32, stride_x=N,
                stride_y=N, M=M, N=N, eps=1e-5, HAS_BIAS=True)))
            cases.append(launch_case("layer_norm_bwd_dx", _layer_norm_bwd_dx, launch, problem, dict(
                DY=dtype, X=dtype, W=wdtype, Mean=torch.float32, Rstd=torch.float32, DX=dtype,
                DW_partial=torch.float32, DB_partial=torch.float32, stride_dy=N, stride_x=N, stride_dx=N, M=M, N=N,
                HAS_BIAS=True)))
            cases.append(launch_case("layer_norm_sum_partials", _sum_partials, SUM_PARTIALS_CONFIG, problem, dict(
                Partial=torch.float32, Out=wdtype, P=programs, N=N)))
    return cases
