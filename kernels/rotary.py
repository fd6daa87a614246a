"""Rotary position embedding (RoPE) of queries or keys, forward and backward, in Triton.

    y[..., i]        = x[..., i] cos(a_i) - x[..., i + D/2] sin(a_i)
    y[..., i + D/2]  = x[..., i] sin(a_i) + x[..., i + D/2] cos(a_i),    a_i = position * base^(-2i / D)

for i < D/2: the two halves of each head are rotated as pairs (GPT-NeoX's and Llama's layout, which nanochat and
modded-nanogpt use too). The angles are computed in the kernel from the positions (fp32), so there is no cos/sin
table to read; positions may differ per row (the ragged positions of decoding from a KV cache). The backward is
the rotation by -a: the same kernel with the sine negated.

Each program rotates BLOCK_T positions of one batch row, for every head in turn: the cos/sin tile (BLOCK_T, D/2),
whose precise sin and cos cost tens of instructions per element, is computed once and used for all H heads (the
kernel reads and writes 8 bytes per bf16 pair, so per-head sin/cos would make it compute-bound). Each head's two
halves are read from any strides with a contiguous last dimension (the model's (B, T, H, D).transpose(1, 2) views
of c_attn's output, in place) and written to a contiguous (B, H, T, D) tensor.
"""
import math

import torch
import triton
import triton.language as tl

from kernels._common import DTYPE_NAMES, check_device, check_float, interpreting, launch_case, warps_for


@triton.jit
def _rotary(X, Pos, Y, stride_xb, stride_xh, stride_xt, stride_pb, H, T, log2_base,
            INVERSE: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    mask = (t[:, None] < T) & (i[None, :] < HALF)
    pos = tl.load(Pos + b * stride_pb + t, mask=t < T, other=0).to(tl.float32)
    inv_freq = tl.exp2(i.to(tl.float32) * (-log2_base / HALF))  # base^(-2i / D)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin
    x_rows = X + b * stride_xb + t.to(tl.int64)[:, None] * stride_xt + i[None, :]
    y_rows = Y + (b * H * T + t.to(tl.int64))[:, None] * (2 * HALF) + i[None, :]
    for h in range(0, H):
        x1 = tl.load(x_rows + h * stride_xh, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + h * stride_xh + HALF, mask=mask, other=0.0).to(tl.float32)
        y_head = y_rows + h * T * (2 * HALF)
        tl.store(y_head, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_head + HALF, (x1 * sin + x2 * cos).to(Y.dtype.element_ty), mask=mask)


def launch_config(D: int, interpreter: bool | None = None) -> dict:
    """BLOCK_T positions per program: tiles of ~2K elements per half on a GPU (8 per thread, warps_for), ~32K
    under the interpreter, where every program costs Python time."""
    if interpreter is None:
        interpreter = interpreting()
    block_half = triton.next_power_of_2(D // 2)
    block_t = max(1, (32768 if interpreter else 2048) // block_half)
    return dict(BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=warps_for(block_t * block_half), num_stages=1)


@torch.library.custom_op("nanogpt_kernels::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, positions: torch.Tensor, base: float, inverse: bool) -> torch.Tensor:
    """x (B, H, T, D) rotated by positions (B, T) (stride 0 over B when shared) at `base`; inverse: by -angle."""
    B, H, T, D = x.shape
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    if y.numel():
        config = launch_config(D)
        grid = (triton.cdiv(T, config["BLOCK_T"]), B)
        _rotary[grid](x, positions, y, *x.stride()[:3], positions.stride(0), H, T, math.log2(base),
                      INVERSE=inverse, HALF=D // 2, **config)
    return y


@_rotary_op.register_fake
def _(x, positions, base, inverse):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    _, positions, base, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.base, ctx.inverse = base, inverse


def _backward(ctx, dy):
    (positions,) = ctx.saved_tensors
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    # a rotation's transpose is the rotation by the opposite angle
    return _rotary_op(dy, positions, ctx.base, not ctx.inverse), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE of x (B, H, T, D), D even, by integer positions (T,) (every row alike) or (B, T) (per row, e.g. the
    positions of decoding steps): the halves x[..., :D/2] and x[..., D/2:] rotated as pairs by position *
    base^(-2i/D). Any strides with a contiguous last dimension; float32, float16 or bfloat16, fp32 arithmetic,
    output contiguous in x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("rotary: x must be a 4-d tensor (B, H, T, D)")
    check_float("rotary", "x", x)
    B, H, T, D = x.shape
    if D % 2:
        raise ValueError(f"rotary: the head dim D={D} must be even (its two halves are rotated as pairs)")
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype.is_complex \
            or positions.dtype == torch.bool:
        raise TypeError("rotary: positions must be an integer tensor (T,) or (B, T)")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(f"rotary: positions has shape {tuple(positions.shape)}, expected ({T},) or ({B}, {T})")
    if not base > 1.0:
        raise ValueError(f"rotary: base={base} must be > 1 (10000 in Llama and GPT-NeoX)")
    check_device("rotary", x, positions)
    if x.stride(-1) != 1:
        x = x.contiguous()
    positions = positions.to(torch.int32)
    positions = positions.expand(B, T) if positions.dim() == 1 else positions.contiguous()
    return _rotary_op(x, positions, float(base), False)


# ------------------------------------------------------------------------------------------------
# what `python -m kernels.inspect` compiles: GPT-2 124M's q or k (B 16, H 12, T 1024, D 64) as c_attn's strided
# views, and a D=128 head, with the launcher's parameters


def inspect_cases():
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for D in (64, 128):
            width = 3 * 12 * D
            for inverse in (False, True):
                problem = {"dtype": DTYPE_NAMES[dtype], "head_dim": D, "inverse": inverse}
                config = launch_config(D, interpreter=False)
                cases.append(launch_case("rotary", _rotary, config, problem, dict(
                    X=dtype, Pos=torch.int32, Y=dtype, stride_xb=1024 * width, stride_xh=D, stride_xt=width,
                    stride_pb=0, H=12, T=1024, log2_base=13.287712379549449, INVERSE=inverse, HALF=D // 2)))
    return cases
