"""LayerNorm and RMSNorm over the last dimension, forward and backward, in Triton; optionally fused with the
residual add before them (a pre-LN transformer's `x = x + branch(...); h = ln(x)`, as `add_layer_norm` and
`add_rms_norm`).

    LayerNorm: y = (h - mean) * rstd * w + b,   rstd = 1 / sqrt(var + eps),   var the biased variance
    RMSNorm:   y = h * rstd * w,                rstd = 1 / sqrt(mean(h^2) + eps)          (h = x (+ residual))

One kernel pair does both: RMSNorm is LayerNorm with the mean taken as 0 (the RMS constexpr), so the math below
is written once and RMSNorm's code has no centring, no mean stored, and one row sum less in the backward.

Forward: each program holds whole rows in registers (one row when they are wide, a tile of rows when narrow),
adds the residual and stores h (the stream's dtype) if there is one, computes mean then the variance of
(h - mean) in fp32 (two passes over registers: no E[h^2] - E[h]^2 cancellation for rows with a large mean), writes
y (in the autocast dtype under torch.autocast: it feeds a matmul) and saves mean and rstd for backward.

Backward, with hhat = (h - mean) * rstd and wdy = w * dy:
    dh = rstd * (wdy - hhat * mean(hhat * wdy) - mean(wdy))  (+ the gradient reaching h directly, if fused)
    (RMSNorm: mean = 0 and no mean(wdy) term: the mean was not subtracted in the forward)
    dw = sum over rows of dy * hhat,   db = sum over rows of dy
Two programs per SM each walk a contiguous run of rows, compute dh in the same row pass and add each tile's column
sums into 1-D dw/db accumulators (a few registers per thread); one small launch then adds the programs' partial
sums. No atomics: the result is deterministic and there is no contention whatever the number of rows. x and the
residual both receive dh.
"""
import torch
import triton
import triton.language as tl

from kernels._common import (
    DTYPE_NAMES,
    autocast_dtype,
    check_device,
    check_float,
    interpreting,
    launch_case,
    num_programs_hint,
    warps_for,
)


@triton.jit
def _layer_norm_fwd(X, Residual, H, Y, W, B, Mean, Rstd, stride_x, stride_r, stride_h, stride_y, M, N, eps,
                    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    # BLOCK_M whole rows per program (1 for wide rows; several for narrow ones, to keep programs busy)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # h = x + residual, stored in the stream's dtype; the normalization reads h as stored (rounded), which
        # is what the backward pass reads back and what the unfused `LN(x + residual)` normalizes
        x += tl.load(Residual + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    if RMS:  # no centring: the masked loads are already 0 past N
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd(DY, DH, X, W, Mean, Rstd, DX, DW_partial, DB_partial, stride_dy, stride_dh, stride_x, stride_dx,
                    M, N, rows_per_program, HAS_DH: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # program p owns the contiguous rows [p * rows_per_program, (p + 1) * rows_per_program), walks them BLOCK_M at
    # a time, and adds each tile's dw/db column sums into 1-D accumulators: BLOCK_N / threads registers each
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row0 in range(row_start, row_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if RMS:  # x is 0 where masked
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:  # the gradient reaching the fused residual sum h directly (the stream's skip path)
            dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)
    tl.store(DW_partial + pid * N + cols, dw_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * N + cols, db_acc, mask=col_mask)


@triton.jit
def _sum_partials(DW_partial, DB_partial, DW, DB, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """DW[n] = sum over p of DW_partial[p, n] (program_id(1) == 0), and the same for DB (program_id(1) == 1), for
    (P, N) fp32 buffers: dweight and dbias in one launch, one program per BLOCK_N columns of each."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    is_db = tl.program_id(1) == 1
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        offsets = rows[:, None] * N + cols[None, :]
        mask = (rows[:, None] < P) & (cols[None, :] < N)
        if is_db:
            acc += tl.load(DB_partial + offsets, mask=mask, other=0.0)
        else:
            acc += tl.load(DW_partial + offsets, mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if is_db:
        tl.store(DB + cols, total.to(DB.dtype.element_ty), mask=cols < N)
    else:
        tl.store(DW + cols, total.to(DW.dtype.element_ty), mask=cols < N)


def _block_n(N: int, element_size: int) -> int:
    block = triton.next_power_of_2(N)
    limit = 65536 // element_size  # the whole row lives in registers
    if block > limit:
        raise ValueError(f"layer_norm: rows of {N} elements are wider than this kernel's limit of {limit} "
                         f"for {element_size}-byte elements")
    return block


def _rows_per_program(block_n: int, interpreter: bool) -> int:
    """Forward: rows per program, ~4K elements on a GPU (narrow rows share a program), ~64K under the
    interpreter, where each program costs Python time and wide numpy tiles cost little."""
    budget = 65536 if interpreter else 4096
    return max(1, min(128, budget // block_n))


def _bwd_rows_per_tile(block_n: int, interpreter: bool) -> int:
    """Backward: rows per loop step, ~2K elements on a GPU (two rows at width 768, one from 1025 up), launched with
    warps_for(rows * block_n) warps: 8 elements per thread of each of x, dy, xhat, w and the two 1-D accumulators
    (fewer), which keeps the kernel near 80 registers; ~64K elements under the interpreter (see _rows_per_program)."""
    budget = 65536 if interpreter else 2048
    return max(1, min(128, budget // block_n))


def launch_config(N: int, element_size: int, interpreter: bool | None = None, backward: bool = False) -> dict:
    """The forward's (or the backward's) launch parameters for rows of N elements; element_size: the narrowest
    of the tensors a row is read from or written to. `interpreter`: which parameters, the interpreter's or a GPU's
    (default: where this process runs; `python -m kernels.inspect` and the config tests ask for the GPU's)."""
    if interpreter is None:
        interpreter = interpreting()
    block_n = _block_n(N, element_size)
    if not backward:
        return dict(BLOCK_M=_rows_per_program(block_n, interpreter), BLOCK_N=block_n, num_warps=warps_for(block_n),
                    num_stages=1)
    block_m = _bwd_rows_per_tile(block_n, interpreter)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n), num_stages=1)


def _bwd_programs(M: int, block_m: int, programs_hint: int) -> tuple[int, int]:
    """(programs, rows per program): about programs_hint programs, each a run of whole tiles."""
    tiles = triton.cdiv(M, block_m)
    rows_per_program = triton.cdiv(tiles, max(1, min(tiles, programs_hint))) * block_m  # only the last tile has a tail
    return triton.cdiv(M, rows_per_program), rows_per_program


BWD_PROGRAMS_PER_SM = 2  # the backward's persistent programs: two per SM, each a contiguous run of rows
# the reduction of the per-program dw/db partial sums: a fixed launch, 48 programs at width 768
SUM_PARTIALS_CONFIG = dict(BLOCK_P=128, BLOCK_N=32, num_warps=4, num_stages=1)


# ------------------------------------------------------------------------------------------------
# PyTorch custom ops: opaque to torch.compile (traced through their fake implementations), differentiable
# through register_autograd. torch.library.custom_op rather than triton_op: its fake tensors never reach
# the kernel launch, so torch.compile(fullgraph=True) works on the CPU interpreter too.


@torch.library.custom_op("nanogpt_kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None, rms: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd): h = x + residual and y = LayerNorm(h) (RMSNorm(h) with rms; mean is then an empty
    tensor) in out_dtype (default: h's dtype). Without a residual y = LayerNorm(x) and h is an empty tensor (an
    output may not alias the input x)."""
    N = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    stream_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((M, N), dtype=out_dtype or stream_dtype, device=x.device)
    h = torch.empty((M, N) if residual is not None else (0,), dtype=stream_dtype, device=x.device)
    mean = torch.empty(M if not rms else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        r2 = _rows(residual) if residual is not None else x2
        config = launch_config(N, min(x.element_size(), y.element_size()))
        _layer_norm_fwd[(triton.cdiv(M, config["BLOCK_M"]),)](
            x2, r2, h if residual is not None else y, y, weight, bias if bias is not None else weight,
            rstd if rms else mean, rstd,
            x2.stride(0), r2.stride(0), N, y.stride(0), M, N, eps, HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None, RMS=rms, **config)
    return y.view(x.shape), (h.view(x.shape) if residual is not None else h), mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype, rms=False):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stream_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    h = x.new_empty(x.shape if residual is not None else (0,), dtype=stream_dtype)
    return (x.new_empty(x.shape, dtype=out_dtype or stream_dtype), h,
            x.new_empty(M if not rms else 0, dtype=torch.float32), x.new_empty(M, dtype=torch.float32))


def _rows(t):
    """t as (rows, N) with unit column stride (a view when it already has one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@torch.library.custom_op("nanogpt_kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                       mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool, rms: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of y = LayerNorm(x) (RMSNorm(x) with rms: mean is empty, never read); dh, if given, is a gradient reaching x directly (the fused
    residual sum's own output) and is added to dx in the same pass."""
    N = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    dh2 = _rows(dh) if dh is not None else dy2
    M = x2.shape[0]
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dw = torch.empty(N, dtype=weight.dtype, device=x.device)
    db = torch.empty(N, dtype=weight.dtype, device=x.device)
    if M == 0:
        return dx.view(x.shape), dw.zero_(), db.zero_()
    config = launch_config(N, min(x.element_size(), dy.element_size()), backward=True)
    programs, rows_per_program = _bwd_programs(M, config["BLOCK_M"],
                                               num_programs_hint(x.device, per_sm=BWD_PROGRAMS_PER_SM))
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device) if has_bias else dw_partial
    _layer_norm_bwd[(programs,)](dy2, dh2, x2, weight, rstd if rms else mean, rstd, dx, dw_partial, db_partial,
                                 dy2.stride(0), dh2.stride(0), x2.stride(0), dx.stride(0), M, N, rows_per_program,
                                 HAS_DH=dh is not None, HAS_BIAS=has_bias, RMS=rms, **config)
    _sum_partials[(triton.cdiv(N, SUM_PARTIALS_CONFIG["BLOCK_N"]), 2 if has_bias else 1)](
        dw_partial, db_partial, dw, db, programs, N, **SUM_PARTIALS_CONFIG)
    if not has_bias:
        db.zero_()
    return dx.view(x.shape), dw, db


@_layer_norm_bwd_op.register_fake
def _(dy, dh, x, weight, mean, rstd, has_bias, rms=False):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype, rms = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.rms = rms
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _backward(ctx, dy, dh, _dmean, _drstd):
    normalized_input, weight, mean, rstd = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    dh = dh if has_residual else None
    dsum, dw, db = _layer_norm_bwd_op(dy, dh, normalized_input, weight, mean, rstd, ctx.has_bias, ctx.rms)
    # h = x + residual: both receive dh's total; each in its own dtype (under autocast the stream is fp32 while
    # the residual branch's output is half)
    dresidual = dsum.to(ctx.residual_dtype) if has_residual else None
    return dsum.to(ctx.x_dtype), dresidual, dw, (db if ctx.has_bias else None), None, None, None


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _output_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Under torch.autocast, the autocast dtype: the LayerNorm output feeds a matmul that would cast it to that
    dtype anyway, so writing it there saves a pass over memory. None (the input's dtype) otherwise."""
    return autocast_dtype(x.device)


def _check(name, x, weight, bias, residual=None):
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"{name}: x must be a tensor with at least one dimension (the one normalized)")
    check_float(name, "x", x)
    check_float(name, "weight", weight)
    N = x.shape[-1]
    if residual is not None:
        check_float(name, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)}, expected x's shape "
                             f"{tuple(x.shape)}")
    if weight.shape != (N,):
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected ({N},) to match x's "
                         f"last dimension")
    if bias is not None:
        check_float(name, "bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({N},) to match x's "
                             f"last dimension")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{name}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    check_device(name, x, residual, weight, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x, like F.layer_norm(x, (N,), weight, bias, eps).

    Any leading shape; float32, float16 or bfloat16 in and out with fp32 arithmetic inside; weight and bias
    of shape (N,); bias=None for no bias. Under torch.autocast the output is in the autocast dtype (it feeds a
    matmul), where F.layer_norm would return float32."""
    _check("layer_norm", x, weight, bias)
    return _layer_norm_fwd_op(x, None, weight, bias, float(eps), _output_dtype(x))[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, LayerNorm(h)) with h = x + residual, in one pass: the residual stream's update and the next
    LayerNorm. h has the promoted dtype of x and residual (the stream's); the normalized output is in that dtype,
    or the autocast dtype under torch.autocast. Gradients flow to x and residual through both outputs."""
    _check("add_layer_norm", x, weight, bias, residual)
    y, h, _, _ = _layer_norm_fwd_op(x, residual, weight, bias, float(eps), _output_dtype(x))
    return h, y


def _rms_eps(x, eps):
    return float(torch.finfo(x.dtype).eps if eps is None else eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of x, like F.rms_norm(x, (N,), weight, eps): x / sqrt(mean(x^2) + eps) *
    weight, eps None meaning torch.finfo(x.dtype).eps as there. Dtypes, shapes and autocast as layer_norm's."""
    _check("rms_norm", x, weight, None)
    return _layer_norm_fwd_op(x, None, weight, None, _rms_eps(x, eps), _output_dtype(x), True)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)) with h = x + residual, in one pass, as add_layer_norm."""
    _check("add_rms_norm", x, weight, None, residual)
    y, h, _, _ = _layer_norm_fwd_op(x, residual, weight, None, _rms_eps(x, eps), _output_dtype(x), True)
    return h, y


# ------------------------------------------------------------------------------------------------
# what `python -m kernels.inspect` compiles: each kernel at GPT-2's shapes (16384 rows of 768 = B 16 x T 1024; the
# 1.5B model's 1600; 3072) in the dtypes the model hands it, with the launch parameters the launcher computes

# (stream = x and h, residual branch output, normalized output y and its gradient dy, weights): under autocast the
# stream is fp32, the branch outputs and y half, the weights fp32; without autocast everything is one dtype
INSPECT_DTYPES = [(torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
                  (torch.float32, torch.float16, torch.float16, torch.float32),
                  (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
                  (torch.float32, torch.float32, torch.float32, torch.float32)]
INSPECT_WIDTHS = (768, 1600, 3072)


# RMSNorm (the RMS constexpr, no bias) at the model's two training dtypes (autocast bf16, plain bf16) and the
# narrowest and widest widths: its code is LayerNorm's minus the centring, the other combinations add rows, not code
INSPECT_RMS = [(dtypes, N) for dtypes in INSPECT_DTYPES[::2] for N in (768, 3072)]


def inspect_cases(rows=16384, sms=132):
    cases = []
    for stream, branch, out, param in INSPECT_DTYPES:
        for N in INSPECT_WIDTHS:
            problem = {"dtype": DTYPE_NAMES[out], "stream": DTYPE_NAMES[stream], "width": N}
            narrowest = min(torch.empty((), dtype=t).element_size() for t in (stream, out))
            fwd = launch_config(N, narrowest, interpreter=False)
            bwd = launch_config(N, narrowest, interpreter=False, backward=True)
            programs, rows_per_program = _bwd_programs(rows, bwd["BLOCK_M"], sms * BWD_PROGRAMS_PER_SM)
            for rms in (False, True) if ((stream, branch, out, param), N) in INSPECT_RMS else (False,):
                name = "rms_norm" if rms else "layer_norm"
                for residual in (True, False):
                    cases.append(launch_case(
                        f"{name}_fwd" + ("_add" if residual else ""), _layer_norm_fwd, fwd, problem,
                        dict(X=stream, Residual=branch, H=stream, Y=out, W=param, B=param, Mean=torch.float32,
                             Rstd=torch.float32, stride_x=N, stride_r=N, stride_h=N, stride_y=N, M=rows, N=N,
                             eps=1e-5, HAS_RESIDUAL=residual, HAS_BIAS=not rms, RMS=rms)))
                for dh in (True, False):
                    cases.append(launch_case(
                        f"{name}_bwd" + ("_add" if dh else ""), _layer_norm_bwd, bwd, problem,
                        dict(DY=out, DH=stream, X=stream, W=param, Mean=torch.float32, Rstd=torch.float32, DX=stream,
                             DW_partial=torch.float32, DB_partial=torch.float32, stride_dy=N, stride_dh=N, stride_x=N,
                             stride_dx=N, M=rows, N=N, rows_per_program=rows_per_program, HAS_DH=dh,
                             HAS_BIAS=not rms, RMS=rms)))
            if stream == out == torch.float32:  # the reduction sees fp32 partials whatever the activations
                cases.append(launch_case("layer_norm_sum_partials", _sum_partials, SUM_PARTIALS_CONFIG,
                                         {"dtype": "fp32", "width": N, "programs": programs},
                                         dict(DW_partial=torch.float32, DB_partial=torch.float32, DW=param, DB=param,
                                              P=programs, N=N)))
    return cases
