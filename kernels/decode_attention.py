"""Decode attention over a static KV cache, split-K ("flash-decoding"), in Triton.

    O[b, h, i] = softmax(q[b, h, i] . K[b, h, :n_i]^T * scale) V[b, h, :n_i],   n_i = lengths[b] - Tq + i + 1

A decoding step has a few new queries (Tq = 1..16) per (row, head) and up to Tmax cached keys. One program
per (row, head) would leave most of a GPU idle and read the cache serially, so the keys are split across
programs instead:

  1. split kernel, grid (num_splits, B*H): program s walks its chunk of keys [s*chunk, (s+1)*chunk), clipped
     to the row's length, with an online softmax in fp32, and writes its partial output (already divided by
     its own softmax sum) and the base-2 logsumexp of its scores;
  2. combine kernel, grid (B*H,): the exact softmax over all keys is the partials weighted by
     2^(lse_s - max_s lse_s), normalized.

Query i of row b sits at position lengths[b] - Tq + i (the new queries are the last Tq valid positions: their
own keys are written to the cache before the call) and sees the keys up to its own position. Rows may have
different lengths (ragged batches); chunks past a row's length exit without reading anything, so the work
follows the lengths while the launch depends only on the static shapes (what a CUDA graph needs: no .item(),
no host sync, nothing sized by the data).

Scores are computed by broadcasting (q[:, None, :] * k[None, :, :], summed over D) rather than tl.dot: with
Tq <= 16 the step is bound by reading the cache, the products are few, and the same code runs for fp32, fp16
and bf16 under Triton's interpreter (which cannot run bf16 dots) as on the GPU. Inputs are upcast to fp32.
"""
import math

import torch
import triton
import triton.language as tl

from kernels._common import (
    DTYPE_NAMES,
    LOG2E,
    block_d_of,
    check_device,
    check_qkv,
    check_softcap,
    launch_case,
    num_programs_hint,
    softcap_mode,
    softcap_tanh,
    window_sides,
)

MAX_QUERIES = 16  # new queries per call (speculative / multi-token decoding); 1 for plain sampling
MAX_HEAD_DIM = 256
# elements of the (BLOCK_M, BLOCK_N, BLOCK_D) product tile a program holds: ~32 fp32 registers per thread at
# 4 warps (8192 at Tq=1, D=64 reached 255 registers and spilled on sm_90; checked with `python -m kernels.inspect`).
# Many queries shrink BLOCK_N down to 4 rather than grow the tile: 8-warp tiles of 8 and 16 queries spilled 8-16 B
# on sm_80 and sm_90 (`python -m kernels.inspect --arch sm_80 --kernel decode_attention_split`).
TILE_ELEMENTS = 4096
MIN_BLOCK_N, MAX_BLOCK_N = 4, 128


@triton.jit
def _decode_split_kernel(Q, K, V, Lengths, O_part, LSE_part, sm_scale, softcap,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         H, GROUP, HEADS, Tq, D, window_left, chunk, num_splits,
                         WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (split, b, head block): HEADS query heads of one kv head (GQA: GROUP share it; HEADS divides GROUP)
    times Tq queries, as rows r = head * Tq + query of one tile, so the kv head's chunk is read once for all."""
    split = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)
    blocks = H // HEADS
    b, h0 = pid // blocks, (pid % blocks) * HEADS  # the first query head of this program
    hk = h0 // GROUP
    length = tl.load(Lengths + b).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_M)
    head, query = offs_r // Tq, offs_r % Tq
    rows = offs_r < HEADS * Tq
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = length - Tq + query  # the position of each new query in its row
    q_mask = rows[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + (h0 + head[:, None]) * stride_qh + query[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0).to(tl.float32)
    q = q * (sm_scale * LOG2E)  # scores in log2 units: exp(x) = exp2(x * log2(e))
    cap_in = 1.0 / (softcap * LOG2E)  # softcap * tanh(score / softcap), on the scaled log2 scores
    cap_out = softcap * LOG2E

    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo = split * chunk
    if WINDOW:  # keys before the first query's window are never read
        lo = tl.maximum(lo, length - Tq - window_left)
    hi = tl.minimum(split * chunk + chunk, length)  # empty when the chunk starts past the row's length
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        qk = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BLOCK_M, BLOCK_N)
        if SOFTCAP:  # the tanh kernels.attention takes for the same softcap and dtype
            qk = softcap_tanh(qk * cap_in, SOFTCAP) * cap_out
        visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < hi)
        if WINDOW:
            visible = visible & (offs_n[None, :] >= q_pos[:, None] - window_left)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query that has seen no key yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    # a query that saw no key of this chunk: output 0, lse -inf (weight 0 in the combine)
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    # row of O_part / LSE_part, layout (B*H, num_splits, Tq)
    part = ((b * H + h0 + head) * num_splits + split) * Tq + query
    tl.store(LSE_part + part, lse, mask=rows)
    tl.store(O_part + part[:, None] * D + offs_d[None, :], acc, mask=q_mask)


@triton.jit
def _decode_combine_kernel(O_part, LSE_part, O, stride_ob, stride_oh, stride_om, H, Tq, D, num_splits,
                           BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Tq
    d_mask = offs_d < D
    # first pass: the largest logsumexp over all splits, per query
    lse_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(LSE_part + (bh * num_splits + offs_s[:, None]) * Tq + offs_m[None, :],
                      mask=(offs_s[:, None] < num_splits) & m_mask[None, :], other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(lse, axis=0))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    # second pass: the partial outputs weighted by their share of the softmax mass
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, num_splits):
        part = (bh * num_splits + s) * Tq + offs_m
        w = tl.math.exp2(tl.load(LSE_part + part, mask=m_mask, other=float("-inf")) - lse_max)
        o = tl.load(O_part + part[:, None] * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        total += w
        acc += w[:, None] * o
    acc = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ------------------------------------------------------------------------------------------------
# launch configuration: a function of the static shapes only (Tq, D), the same on the GPU and under the
# interpreter, so the tests run every configuration that ships.


def _block_m(Tq):
    return triton.next_power_of_2(Tq)


def launch_config(Tq: int, D: int) -> dict:
    """Block sizes and warps of the split kernel for Tq new queries of head dim D."""
    block_m, block_d = _block_m(Tq), block_d_of(D)
    block_n = min(MAX_BLOCK_N, max(MIN_BLOCK_N, TILE_ELEMENTS // (block_m * block_d)))
    num_warps = 4 if block_m * block_n * block_d <= TILE_ELEMENTS else 8
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps, "num_stages": 2}


def shipped_configs() -> list[tuple[int, int, dict]]:
    """(Tq bucket, head dim bucket, config) for every configuration launch_config can return."""
    out = []
    for tq in (1, 2, 4, 8, 16):
        for d in (16, 32, 64, 128, 256):
            out.append((tq, d, launch_config(tq, d)))
    return out


COMBINE_BLOCK_S = 16  # splits per step of the combine's max pass
COMBINE_NUM_WARPS = 4


def num_splits_for(B: int, H: int, Tmax: int, block_n: int, device: torch.device) -> int:
    """Enough programs to fill the device (a few per SM), never more splits than key blocks. Static shapes
    only: the same number every step, whatever the lengths."""
    return _num_splits(B, H, Tmax, block_n, num_programs_hint(device, per_sm=4))


def _num_splits(B, H, Tmax, block_n, programs):
    return max(1, min(triton.cdiv(Tmax, block_n), triton.cdiv(programs, B * H)))


def _chunk(Tmax, num_splits, block_n):
    """Keys per split: a whole number of key blocks."""
    return triton.cdiv(triton.cdiv(Tmax, num_splits), block_n) * block_n


# ------------------------------------------------------------------------------------------------
# custom op


def heads_per_program(group: int, Tq: int) -> int:
    """Query heads of one kv head that a split program takes together: the largest divisor of `group` whose rows
    (heads x Tq queries) fit the MAX_QUERIES rows the shipped configs are sized for."""
    return max(d for d in range(1, group + 1) if group % d == 0 and d * Tq <= MAX_QUERIES)


@torch.library.custom_op("nanogpt_kernels::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                         num_splits: int, softcap: float, window_left: int) -> torch.Tensor:
    B, H, Tq, D = q.shape
    H_kv, Tmax = k.shape[1], k.shape[2]
    heads = heads_per_program(H // H_kv, Tq)
    cfg = launch_config(heads * Tq, D)
    chunk = _chunk(Tmax, num_splits, cfg["BLOCK_N"])
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    o_part = torch.empty((B * H, num_splits, Tq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * H, num_splits, Tq), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_splits, B * H // heads)](
        q, k, v, lengths, o_part, lse_part, scale, softcap or 1.0,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, H // H_kv, heads, Tq, D, max(window_left, 0), chunk,
        num_splits, WINDOW=window_left >= 0, SOFTCAP=softcap_mode(softcap, q.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _decode_combine_kernel[(B * H,)](
        o_part, lse_part, o, *o.stride()[:3], H, Tq, D, num_splits,
        BLOCK_M=_block_m(Tq), BLOCK_S=COMBINE_BLOCK_S, BLOCK_D=cfg["BLOCK_D"], num_warps=COMBINE_NUM_WARPS,
        num_stages=1)
    return o


@_decode_attention_op.register_fake
def _(q, k, v, lengths, scale, num_splits, softcap, window_left):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _visible_mask(lengths, Tq, Tmax, window_left=-1):
    """(B, 1, Tq, Tmax) bool: query i of row b (at position lengths[b] - Tq + i) sees key j iff j <= its position
    (and, with a window, j >= its position - window_left)."""
    q_pos = lengths.long()[:, None] - Tq + torch.arange(Tq, device=lengths.device)[None, :]
    keys = torch.arange(Tmax, device=lengths.device)[None, None, :]
    visible = keys <= q_pos[:, :, None]
    if window_left >= 0:
        visible &= keys >= q_pos[:, :, None] - window_left
    return visible[:, None]


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, scale, _, softcap, window_left = inputs
    ctx.save_for_backward(q, k, v, lengths, output)
    ctx.scale, ctx.softcap, ctx.window_left = scale, softcap, window_left


def _backward(ctx, do):
    # Decoding is inference; the gradient is here so the op is a complete autograd citizen. It recomputes the
    # attention weights in fp32 with plain tensor math (no kernel): fine for the few queries of a decode step.
    q, k, v, lengths, o = ctx.saved_tensors
    Tq, Tmax, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    qf, dof = q.float(), do.float()
    kf, vf = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    s = (qf @ kf.transpose(-2, -1)) * ctx.scale
    cap = torch.tanh(s / ctx.softcap) if ctx.softcap > 0.0 else None
    if cap is not None:
        s = ctx.softcap * cap
    p = torch.softmax(s.masked_fill(~_visible_mask(lengths, Tq, Tmax, ctx.window_left), float("-inf")), dim=-1)
    dv = p.transpose(-2, -1) @ dof
    dp = dof @ vf.transpose(-2, -1)
    ds = p * (dp - (dof * o.float()).sum(-1, keepdim=True))
    if cap is not None:
        ds = ds * (1.0 - cap * cap)
    dq = (ds @ kf) * ctx.scale
    dk = (ds.transpose(-2, -1) @ qf) * ctx.scale

    def per_kv_head(t):  # the group's query heads share a kv head: their gradients sum
        return t.unflatten(1, (-1, group)).sum(2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype), None, None, None, None, None


_decode_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, lengths, softcap):
    check_qkv("decode_attention", q, k, v, "are the cache, (B, H_kv, Tmax, D) with q's B and D, H_kv dividing q's H")
    B, H, Tq, D = q.shape
    if not 1 <= Tq <= MAX_QUERIES:
        raise ValueError(f"decode_attention: {Tq} new queries; supported: 1 to {MAX_QUERIES} (run a longer "
                         f"chunk as a prefill with kernels.attention)")
    if Tq > k.shape[2]:
        raise ValueError(f"decode_attention: {Tq} new queries but a cache of only {k.shape[2]} positions")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head dim {D} is not supported; supported: 1 to {MAX_HEAD_DIM}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.dtype not in (torch.int32,
                                                                                                torch.int64):
        got = (f"{tuple(lengths.shape)} {lengths.dtype}" if isinstance(lengths, torch.Tensor)
               else type(lengths).__name__)
        raise ValueError(f"decode_attention: lengths must be a (B,) = ({B},) int32 tensor of valid keys per row, "
                         f"got {got}")
    check_softcap("decode_attention", softcap)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} must be contiguous in its last (head) dimension; call "
                             f".contiguous() on it")
    check_device("decode_attention", q, k, v, lengths)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, *, softcap: float | None = None,
                     window: tuple[int | None, int | None] | None = None) -> torch.Tensor:
    """Attention of Tq new queries over a KV cache with per-row valid lengths.

    q: (B, H, Tq, D), 1 <= Tq <= 16; k, v: the cache buffers (B, H_kv, Tmax, D), H_kv dividing H (GQA/MQA: a
    program reads a kv head once for all the query heads that share it), of which the first lengths[b]
    positions of row b are valid (the new queries' own keys included: they are written before the call);
    lengths: (B,) int32 on q's device, Tq <= lengths[b] <= Tmax (not checked: that would need a host sync).
    Query i of row b is at position lengths[b] - Tq + i and sees the keys up to it; with window=(left, 0) only
    the last left + 1 of them (keys before the window are not read). softcap: scores become
    softcap * tanh(score / softcap), as in kernels.attention. float32, float16 or bfloat16, fp32 accumulation,
    output (B, H, Tq, D) in the input dtype. scale defaults to 1/sqrt(D)."""
    _check_inputs(q, k, v, lengths, softcap)
    left, _ = window_sides("decode_attention", window, causal=True)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    B, H, Tq, D = q.shape
    heads = heads_per_program(H // k.shape[1], Tq)
    num_splits = num_splits_for(B, H // heads, k.shape[2], launch_config(heads * Tq, D)["BLOCK_N"], q.device)
    return _decode_attention_op(q, k, v, lengths, float(scale), num_splits, float(softcap or 0.0), left)


# ------------------------------------------------------------------------------------------------
# for `python -m kernels.inspect`: what to compile for a GPU target, from the same config function as the launch


# the options' problem, as kernels.attention's inspection has it: GQA group 4, window (256, 0), softcap 30
OPTIONS = dict(group=4, window=256, softcap=30.0)


def inspect_cases(B=16, H=12, Tmax=1024, sms=132) -> list[dict]:
    """Both kernels x every shipped config at GPT-2's head dims, with the arguments the launcher passes: B rows of
    a (B, H_kv, Tmax, D) cache, the new queries the (B, Tq, H, D).transpose(1, 2) views of c_attn's output, the
    splits that fill `sms` SMs. Plain (H_kv = H), and with OPTIONS for one new query: the config the launch picks
    for the heads a program then takes together (heads_per_program)."""
    problems = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tq, d, _ in shipped_configs():
            if d in (64, 128) and (dtype == torch.bfloat16 or tq == 1):
                problems.append((dtype, tq, d, {}))  # GPT-2's head dims; every Tq bucket in bf16, else Tq = 1
    problems += [(torch.bfloat16, 1, d, OPTIONS) for d in (64, 128)]
    cases = []
    for dtype, tq, d, options in problems:
        group = options.get("group", 1)
        H_kv, heads = H // group, heads_per_program(group, tq)
        cfg = launch_config(heads * tq, d)
        problem = {"dtype": DTYPE_NAMES[dtype], "head_dim": d, "queries": tq}
        if options:
            problem["options"] = " ".join(f"{k}{v:g}" for k, v in options.items())
        C = (H + 2 * H_kv) * d  # c_attn's output row: q, k, v heads side by side
        num_splits = _num_splits(B, H, Tmax, cfg["BLOCK_N"], sms * 4)
        sizes = dict(H=H, Tq=tq, D=d, num_splits=num_splits)
        cache = dict(stride_kb=H_kv * Tmax * d, stride_kh=Tmax * d, stride_kn=d)
        cases.append(launch_case("decode_attention_split", _decode_split_kernel, cfg, problem, dict(
            Q=dtype, K=dtype, V=dtype, Lengths=torch.int32, O_part=torch.float32, LSE_part=torch.float32,
            sm_scale=d ** -0.5, softcap=options.get("softcap", 1.0), stride_qb=tq * C, stride_qh=d, stride_qm=C,
            **cache, **{k.replace("_k", "_v"): v for k, v in cache.items()}, GROUP=group, HEADS=heads,
            window_left=options.get("window", 0), chunk=_chunk(Tmax, num_splits, cfg["BLOCK_N"]),
            WINDOW="window" in options,
            SOFTCAP=softcap_mode(options.get("softcap"), dtype, interpreter=False), **sizes)))
        cases[-1]["loops"] = []  # no tl.dot (scores by broadcast and sum): the cost model reports its loop unnamed
        combine = dict(BLOCK_M=_block_m(tq), BLOCK_S=COMBINE_BLOCK_S, BLOCK_D=cfg["BLOCK_D"],
                       num_warps=COMBINE_NUM_WARPS, num_stages=1)
        cases.append(launch_case("decode_attention_combine", _decode_combine_kernel, combine, problem, dict(
            O_part=torch.float32, LSE_part=torch.float32, O=dtype, stride_ob=H * tq * d, stride_oh=tq * d,
            stride_om=d, **sizes)))
        cases[-1]["loops"] = []
    return cases
