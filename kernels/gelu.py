"""GELU with an optional fused bias add, forward and backward, in Triton.

    exact: y = 0.5 * u * (1 + erf(u / sqrt(2)))                        u = x + bias
    tanh:  y = 0.5 * u * (1 + tanh(sqrt(2/pi) * (u + 0.044715 u^3)))

The MLP computes c_fc without its bias and hands the bias here, so bias + GELU is one read of x and one
write of y instead of two passes over the (B, T, 4C) activation. Both passes work on (BLOCK_M, BLOCK_N) tiles of
the (rows, N) view, so the bias is loaded once per program and no per-element `offset % N` is computed.

Backward reads x (and bias) and dy and writes du = dy * GELU'(u). dbias is du summed over the rows, in fp32:
each program walks a contiguous run of rows of one column block and keeps the column sums in registers while it
writes du, so only a small (programs, N) buffer of partial sums is left to add, instead of a second pass that
re-reads du.
"""
import torch
import triton
import triton.language as tl

from kernels._common import (
    DTYPE_NAMES,
    check_device,
    check_float,
    interpreting,
    launch_case,
    num_programs_hint,
    tanh,
    warps_for,
)

APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _gelu(u, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        return 0.5 * u * (1.0 + tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_grad(u, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        t = tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
    # d/du [u * Phi(u)] = Phi(u) + u * phi(u)
    return 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)


@triton.jit
def _gelu_fwd(X, Bias, Y, M, N, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    # one (BLOCK_M, BLOCK_N) tile of the contiguous (M, N) input per program; the bias slice is loaded once
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    u = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offsets, _gelu(u, APPROX_TANH).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd(DY, X, Bias, DX, DBias_partial, M, N, rows_per_program, HAS_BIAS: tl.constexpr,
              APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # program (p, q) walks the contiguous rows [p * rows_per_program, (p + 1) * rows_per_program) of column block q,
    # BLOCK_M rows at a time, and keeps the column sums of du (dbias) in registers: one fp32 (P, N) partial
    # buffer instead of a second pass re-reading du
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        bias = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row0 in range(row_start, row_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        u = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += bias[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        du = dy * _gelu_grad(u, APPROX_TANH)  # 0 outside the mask, where dy is 0
        tl.store(DX + offsets, du.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            dbias_acc += du
    if HAS_BIAS:
        tl.store(DBias_partial + pid_m * N + cols, tl.sum(dbias_acc, axis=0), mask=col_mask)


def _block(N: int, interpreter: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): tiles of ~2K elements on a GPU, at most 1024 columns wide; ~64K under the interpreter,
    where every program costs Python time and wide numpy tiles cost little."""
    budget, widest = (65536, 4096) if interpreter else (2048, 1024)
    block_n = min(triton.next_power_of_2(N), widest)
    return max(1, budget // block_n), block_n


def launch_config(N: int, interpreter: bool | None = None) -> dict:
    """The launch parameters (forward and backward alike) for rows of N elements. `interpreter`: the interpreter's
    or a GPU's (default: where this process runs; `python -m kernels.inspect` and the config tests ask for the GPU's)."""
    if interpreter is None:
        interpreter = interpreting()
    block_m, block_n = _block(N, interpreter)
    # 8 elements per thread (warps_for). At 16 (4K-element tiles) the backward needed 100-110 registers (2 CTAs of
    # 8 warps per SM on sm_90); at 8 it needs 48-63 and the forward ~31 (full occupancy)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n), num_stages=1)


def _bwd_row_groups(M: int, N: int, block_m: int, block_n: int, programs_hint: int) -> tuple[int, int]:
    """(row groups, rows per group) for the backward: about programs_hint programs over all column blocks, each
    a run of whole tiles."""
    tiles = triton.cdiv(M, block_m)
    groups = max(1, min(tiles, programs_hint // triton.cdiv(N, block_n)))
    rows_per_program = triton.cdiv(tiles, groups) * block_m  # only the last tile has a tail
    return triton.cdiv(M, rows_per_program), rows_per_program


def _rows(x):
    """x as a contiguous (rows, N) tensor."""
    return x.contiguous().view(-1, x.shape[-1])


@torch.library.custom_op("nanogpt_kernels::gelu_fwd", mutates_args=())
def _gelu_fwd_op(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    x2 = _rows(x)
    y = torch.empty_like(x2)
    M, N = x2.shape
    if x2.numel():
        config = launch_config(N)
        _gelu_fwd[(triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]))](
            x2, bias if bias is not None else x2, y, M, N, HAS_BIAS=bias is not None,
            APPROX_TANH=approximate == "tanh", **config)
    return y.view(x.shape)


@_gelu_fwd_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanogpt_kernels::gelu_bwd", mutates_args=())
def _gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                 approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias): dbias summed in fp32 and returned in the bias's dtype; empty when there is no bias."""
    x2, dy2 = _rows(x), _rows(dy)
    dx = torch.empty_like(x2)
    M, N = x2.shape
    dbias = torch.zeros(N if bias is not None else 0, dtype=torch.float32, device=x.device)
    if x2.numel():
        config = launch_config(N)
        row_groups, rows_per_program = _bwd_row_groups(M, N, config["BLOCK_M"], config["BLOCK_N"],
                                                       num_programs_hint(x.device))
        partial = torch.empty((row_groups, N) if bias is not None else (0,), dtype=torch.float32, device=x.device)
        _gelu_bwd[(row_groups, triton.cdiv(N, config["BLOCK_N"]))](
            dy2, x2, bias if bias is not None else x2, dx, partial, M, N, rows_per_program,
            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", **config)
        if bias is not None:
            dbias = partial.sum(0)  # a few hundred rows of partial sums
    return dx.view(x.shape), dbias.to(bias.dtype) if bias is not None else dbias


@_gelu_bwd_op.register_fake
def _(dy, x, bias, approximate):
    dbias = x.new_empty(x.shape[-1] if bias is not None else 0, dtype=bias.dtype if bias is not None else torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dbias


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _gelu_bwd_op(dy, x, bias, ctx.approximate)
    return dx, (dbias if bias is not None else None), None


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
# what `python -m kernels.inspect` compiles: GPT-2's MLP activation (16384 rows of 4 x 768 = 3072; the 1.5B model's
# 6400) in the dtypes the model hands it (under autocast: half activations, fp32 bias), with the launcher's parameters

INSPECT_DTYPES = [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]  # fp16 compiles as bf16 does
INSPECT_WIDTHS = (3072, 6400)


def inspect_cases(rows=16384, sms=132):
    cases = []
    for act, param in INSPECT_DTYPES:
        for N in INSPECT_WIDTHS:
            config = launch_config(N, interpreter=False)
            _, rows_per_program = _bwd_row_groups(rows, N, config["BLOCK_M"], config["BLOCK_N"], sms * 4)
            for approximate in APPROXIMATIONS:
                problem = {"dtype": DTYPE_NAMES[act], "width": N, "tanh": approximate == "tanh"}
                flags = dict(HAS_BIAS=True, APPROX_TANH=approximate == "tanh")
                cases.append(launch_case("gelu_fwd", _gelu_fwd, config, problem,
                                         dict(X=act, Bias=param, Y=act, M=rows, N=N, **flags)))
                cases.append(launch_case("gelu_bwd", _gelu_bwd, config, problem,
                                         dict(DY=act, X=act, Bias=param, DX=act, DBias_partial=torch.float32, M=rows,
                                              N=N, rows_per_program=rows_per_program, **flags)))
    return cases
