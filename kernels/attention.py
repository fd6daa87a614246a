"""Fused attention (the FlashAttention-2 algorithm), forward and backward, with dropout, in Triton.

    O = dropout(softmax(Q K^T * scale + causal mask)) V            Q, K, V: (B, H, T, D)

Forward: one program per (query block, batch*head). K/V tiles stream through an online softmax in fp32:
a running row max m and row sum l rescale the accumulator as larger scores arrive, the output is divided
by l once at the end, and the row's logsumexp (base 2) is saved for backward. Causal: key tiles entirely
above the diagonal are never visited, tiles entirely below it run unmasked, only the diagonal tiles (and
the tail tile past T) are masked.

Backward (P is recomputed from the saved logsumexp, never stored):
    delta = rowsum(dO * O)                                 (preprocess kernel)
    dV = (P Z)^T dO,   dP = (dO V^T) Z,   dS = P (dP - delta),   dK = dS^T Q scale,   dQ = dS K scale
with Z the dropout mask scaled by 1/(1-p). One launch: program n accumulates dK/dV of key block n over the
query blocks that see it, then dQ of query block n over the key blocks it sees. Under a causal mask the two
halves balance (key block n is seen by T - n*BLOCK queries, query block n sees n*BLOCK keys), no atomics,
deterministic. The dK/dV half works on the transposed scores S^T = K Q^T and dP^T = V dO^T, so P^T and dS^T
are already the left operands of dV = P^T dO and dK = dS^T Q: no transpose of P or dS per tile, and every
dot has the owned block (>= 64 rows) as its M dimension, which Hopper's warpgroup MMA (wgmma) needs. At
BLOCK_D=256 the dK and dV accumulators together exceed the registers of a warpgroup, so the program walks the
query blocks twice, dV first, then dK (S^T recomputed: 1.25x the MMA work, no spill).

Loads and stores: on Hopper (sm_90+) the Q/K/V/O/dO/dQ/dK/dV tiles move through TMA tensor descriptors made
on the device (`tl.make_tensor_descriptor`; the hardware clips and zero-fills the tails); elsewhere (sm_80,
the interpreter, or a tensor TMA cannot address) through masked pointer loads. The launch picks the path.

Dropout: element (b*h, i, j) of the mask comes from 32-bit Philox at counter (j//4, i, b*h, 0), output j%4
(each call yields four draws), recomputed identically in every pass, so the mask is never stored. The seed
is a CUDA (or CPU) int64 tensor drawn from torch's generator on the inputs' device and read by the kernels:
torch.manual_seed makes a run reproducible, a CUDA-graph replay draws a fresh seed, and activation
checkpointing (which restores the RNG state) recomputes the same mask.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from kernels._common import (
    DTYPE_NAMES,
    LOG2E,
    PRECISION,
    arch_has_tma,
    arch_of,
    block_d_of,
    check_device,
    check_qkv,
    check_softcap,
    interpreting,
    launch_case,
    softcap_mode,
    softcap_tanh,
    use_tma,
    window_sides,
)

HEAD_DIMS = tuple(range(8, 257, 8))  # BLOCK_D pads each to a power of two; TMA rows need 16 bytes
# from this BLOCK_D on, the backward walks dV and dK one after the other (see _attn_bwd)
SPLIT_DKDV_FROM: tl.constexpr = tl.constexpr(256)


# ------------------------------------------------------------------------------------------------
# tiles: one (rows, BLOCK_D) tile of a (T, D) matrix, through a TMA descriptor or masked pointers


@triton.jit
def _source(base, T, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
            USE_TMA: tl.constexpr):
    """What _load/_store read: a tensor descriptor of the (T, HEAD_DIM) matrix at base, or base itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        return base


@triton.jit
def _heads_source(base, G, stride_g, T, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """What _head_load reads: G heads' (T, HEAD_DIM) matrices from base, stride_g apart, as one 3-d tensor
    descriptor (made once for a walk over all G heads), or base itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[G, T, HEAD_DIM], strides=[stride_g, stride_t, 1],
                                         block_shape=[1, BLOCK_R, BLOCK_D])
    else:
        return base


@triton.jit
def _head_load(src, g, row0, T, stride_g, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """_load of rows row0 .. row0+BLOCK_R of head g of a _heads_source."""
    if USE_TMA:
        return src.load([g, row0, 0]).reshape(BLOCK_R, BLOCK_D)
    else:
        return _load(src + g * stride_g, row0, T, stride_t, HEAD_DIM, BLOCK_R, BLOCK_D, False)


@triton.jit
def _load(src, row0, T, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
          USE_TMA: tl.constexpr):
    """Rows row0 .. row0+BLOCK_R of the matrix, zeros past T and past HEAD_DIM."""
    if USE_TMA:
        return src.load([row0, 0])
    else:
        rows = row0 + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        # HEAD_DIM is a constexpr: when it equals BLOCK_D the column test folds away
        mask = (rows[:, None] < T) & (cols[None, :] < HEAD_DIM)
        return tl.load(src + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store(src, row0, value, T, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
           BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:
        src.store([row0, 0], value)
    else:
        rows = row0 + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < T) & (cols[None, :] < HEAD_DIM)
        tl.store(src + rows[:, None] * stride_t + cols[None, :], value, mask=mask)


@triton.jit
def _store_rows(base, row0, value, T, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """_store of value into rows row0.. of the (T, HEAD_DIM) matrix at base, its source made here."""
    _store(_source(base, T, stride_t, HEAD_DIM, BLOCK_R, BLOCK_D, USE_TMA), row0, value, T, stride_t, HEAD_DIM,
           BLOCK_R, BLOCK_D, USE_TMA)


@triton.jit
def _keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout keep-mask of the (BLOCK_M queries, BLOCK_N keys) tile at (start_m, start_n): one Philox call
    per four keys of a row, all four of its outputs used. The call's counter is the 32-bit words (key group,
    query, batch*head, 0): 32-bit Philox (a 64-bit offset would select Triton's costlier 64-bit Philox)."""
    shape: tl.constexpr = (BLOCK_M, BLOCK_N // 4)
    groups = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    rows = (start_m + tl.arange(0, BLOCK_M)).to(tl.uint32)
    zero = tl.zeros(shape, dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, groups[None, :] + zero, rows[:, None] + zero, zero + bh.to(tl.uint32), zero)
    # interleave so that key 4g + c takes output c of call g: join stacks on a new last axis
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return tl.random.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _within(x, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """lo <= x <= hi, elementwise after broadcast (at least one flag on; a side without its flag is unbounded)."""
    if HAS_HI:
        ok = x <= hi
        if HAS_LO:
            ok = ok & (x >= lo)
    else:
        ok = x >= lo
    return ok


@triton.jit
def _visible(i, j, Tk, lo_off, hi_off, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Whether queries i see keys j (i a column, j a row of indices): j < Tk, and inside the window
    i + lo_off <= j <= i + hi_off (a side without its flag is unbounded). Causal is the right side at Tk - Tq.
    The offsets go on the query column, which the key walk does not change: one compare per score and side."""
    ok = j < Tk
    if WINDOW_LEFT or WINDOW_RIGHT:
        ok = ok & _within(j, i + lo_off, i + hi_off, WINDOW_LEFT, WINDOW_RIGHT)
    return ok


@triton.jit
def _walk_ranges(first, last, N, d_lo, d_hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, MASK_TAIL: tl.constexpr,
                 STEP: tl.constexpr):
    """The tiles of STEP positions that rows first..last walk, when row r sees positions w with
    r + d_lo <= w <= r + d_hi (a side without its flag is unbounded) and w < N. Returns a <= b <= c <= e:
    [a, b) and [c, e) hold the tiles some row sees only in part (walked masked), [b, c) whole tiles every row
    sees (unmasked); tiles outside [a, e) are seen by no row and never visited. a, b, c are multiples of STEP
    (the dropout mask draws four keys per call: tiles start at multiples of 4). Without MASK_TAIL the tile
    holding N needs no mask (the walk past N is harmless) and joins the unmasked part when HAS_HI is off."""
    if HAS_LO:
        a = tl.maximum(first + d_lo, 0) // STEP * STEP
        b = tl.cdiv(tl.maximum(last + d_lo, 0), STEP) * STEP
    else:
        a = 0
        b = 0
    if HAS_HI:
        e = tl.minimum(N, last + d_hi + 1)
        c = tl.maximum(tl.minimum(N, first + d_hi + 1), 0) // STEP * STEP
    elif MASK_TAIL:
        e = N
        c = N // STEP * STEP
    else:
        e = N
        c = N
    e = tl.maximum(e, a)
    if HAS_LO:  # else b = 0 <= e already, and stays a constant the loops below start from
        b = tl.minimum(b, e)
    c = tl.minimum(tl.maximum(c, b), e)
    return a, b, c, e


@triton.jit
def _capped(qk, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """softcap * tanh(score / softcap) in base 2 (cap_in = scale / softcap, cap_out = softcap * log2 e), and the
    tanh, whose 1 - t^2 is the cap's derivative in the backward. SOFTCAP (softcap_mode): which tanh."""
    t = softcap_tanh(qk * cap_in, SOFTCAP)
    return t * cap_out, t


# ------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_tile_loop(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, start_m, lo, hi, Tk, qk_scale, cap_in,
                   cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                   MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                   SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        k = _load(k_src, start_n, Tk, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP:  # capped scores in base 2: the row max and exponent below take them as they are
            qk, _ = _capped(qk, cap_in, cap_out, SOFTCAP)
            scale = 1.0
        else:  # the scale (> 0) and log2(e) fold into one FMA per score: p = exp2(qk * qk_scale - m)
            scale = qk_scale
        if MASK:  # a tile some row sees only in part (window, causal diagonal, keys past Tk): the rest is -inf
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], Tk, lo_off, hi_off, WINDOW_LEFT,
                                   WINDOW_RIGHT), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
        if MASK:  # a row that has seen no key yet keeps m = -inf: exponentiate against 0 (no -inf - -inf)
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_exp = m_new
        p = tl.math.exp2(qk * scale - m_exp[:, None])
        alpha = tl.math.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the normalizer counts every element, dropped or not
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = _load(v_src, start_n, Tk, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, Seed, sm_scale, dropout_p, softcap,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              H, GROUP, Tq, Tk, lo_off, hi_off, T_BUCKET,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
              USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    # T_BUCKET (the next power of two of the longest sequence) is only the autotuner's key. GROUP query heads
    # share one k/v head (GQA; 1 without it): query head h reads kv head h // GROUP
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // GROUP
    q_src = _source(Q + b * stride_qb + h * stride_qh, Tq, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    k_src = _source(K + b * stride_kb + hk * stride_kh, Tk, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _source(V + b * stride_vb + hk * stride_vh, Tk, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    o_src = _source(O + b * stride_ob + h * stride_oh, Tq, stride_om, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    q = _load(q_src, start_m, Tq, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    seed = tl.load(Seed)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    cap_in = sm_scale / softcap
    cap_out = softcap * LOG2E
    dropout_scale = 1.0 / (1.0 - dropout_p)
    # key tiles: [a, b) cut by the window's left side (masked), [b, c) seen whole by every row, [c, e) cut by the
    # right side (causal diagonal) or holding Tk (masked); causal with Tq == Tk: a = b = 0, c = start_m
    last_m = tl.minimum(start_m + BLOCK_M, Tq) - 1
    a, b_, c, e = _walk_ranges(start_m, last_m, Tk, lo_off, hi_off, WINDOW_LEFT, WINDOW_RIGHT, True, BLOCK_N)
    if WINDOW_LEFT:
        acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, start_m, a, b_, Tk,
                                       qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p,
                                       dropout_scale, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, USE_TMA,
                                       HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, start_m, b_, c, Tk,
                                   qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                                   False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, USE_TMA, HEAD_DIM, BLOCK_M,
                                   BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, start_m, c, e, Tk,
                                   qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                                   True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, USE_TMA, HEAD_DIM, BLOCK_M,
                                   BLOCK_N, BLOCK_D)
    # a row that saw no key (a window outside the keys; rows past Tq) outputs 0, and its logsumexp is +inf so
    # that the backward's p = exp2(s - lse) is 0 there
    seen = l_i > 0.0
    l_i = tl.where(seen, l_i, 1.0)
    acc = acc / l_i[:, None]
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lse = tl.where(seen, m_i + tl.math.log2(l_i), float("inf"))
    tl.store(LSE + bh * Tq + offs_m, lse, mask=offs_m < Tq)
    _store(o_src, start_m, acc.to(O.dtype.element_ty), Tq, stride_om, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)


# ------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attn_bwd_preprocess(O, DO, LSE, LSE_PAD, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
                         stride_dom, H, Tq, T_PAD, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O), and a copy of the forward's logsumexp, both in rows of T_PAD (Tq rounded up to
    ROW_PAD) with 0 past Tq: the main kernel then loads whole tiles of them without a mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * T_PAD + offs_m, tl.sum(o * do, axis=1))
    tl.store(LSE_PAD + bh * T_PAD + offs_m, tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0))


@triton.jit
def _dkdv_tile(dk, dv, k, v, q, do, lse, delta, start_m, offs_m, start_n, first_q, last_q, qk_scale, cap_in, cap_out,
               seed, bh, dropout_p, dropout_scale, MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr,
               WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, WITH_DK: tl.constexpr,
               WITH_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK/dV of the BLOCK_N keys at start_n += the BLOCK_M queries at start_m (q, dO, lse, delta loaded), in the
    transposed orientation; WITH_DK / WITH_DV: which of the two this walk accumulates (the other passes through).

    Queries past Tq need no mask: their q/dO rows load as zeros and their lse/delta (padded rows) are 0, so
    p^T = 1 there and both P^T dO and dS^T Q = P^T (V dO^T - 0) Q add nothing to dK/dV. Keys past Tk need none
    either: their rows of dK/dV are never stored."""
    qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # S^T: (keys, queries)
    if SOFTCAP:
        s_t, t_t = _capped(qk_t, cap_in, cap_out, SOFTCAP)
        p_t = tl.math.exp2(s_t - lse[None, :])
    else:
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
    if MASK:
        p_t = tl.where(_within(offs_m[None, :], first_q, last_q, WINDOW_RIGHT, WINDOW_LEFT), p_t, 0.0)
    if WITH_DK:
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if DROPOUT:
        keep_t = tl.trans(_keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N))
        pd_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
        if WITH_DK:
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
    else:
        pd_t = p_t
    if WITH_DV:
        # both left operands rounded before either dot: the fp32 tiles die here, not across the dV dot
        pd_t = pd_t.to(do.dtype)
    if WITH_DK:
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:  # through the cap: d(cap tanh(x / cap)) / dx = 1 - t^2
            ds_t = ds_t * (1.0 - t_t * t_t)
        ds_t = ds_t.to(q.dtype)
    if WITH_DV:
        dv = tl.dot(pd_t, do, dv, input_precision=PRECISION)
    if WITH_DK:
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _key_side_bounds(start_n, lo_off, hi_off, BLOCK_N: tl.constexpr):
    """Key j is seen by queries j - hi_off .. j - lo_off: the bounds (first, last query) of the BLOCK_N keys at
    start_n, as columns, which the query walk does not change (keys past Tk need no mask, see _dkdv_tile)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return (offs_n - hi_off)[:, None], (offs_n - lo_off)[:, None]


@triton.jit
def _dkdv_tile_loop(dk, dv, k, v, q_src, do_src, LSE, Delta, stride_qm, stride_dom, start_n, lo, hi,
                    Tq, Tk, qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                    MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
                    USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """dK/dV of the BLOCK_N keys at start_n over one query head's tiles lo..hi (see _dkdv_tile)."""
    first_q, last_q = _key_side_bounds(start_n, lo_off, hi_off, BLOCK_N)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load(q_src, start_m, Tq, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        do = _load(do_src, start_m, Tq, stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        dk, dv = _dkdv_tile(dk, dv, k, v, q, do, tl.load(LSE + offs_m), tl.load(Delta + offs_m), start_m, offs_m,
                            start_n,
                            first_q, last_q, qk_scale, cap_in, cap_out, seed, bh, dropout_p, dropout_scale, MASK,
                            WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, WITH_DK, WITH_DV, BLOCK_N, BLOCK_M)
    return dk, dv


@triton.jit
def _dkdv_group_walk(dk, dv, k, v, q_heads, do_heads, GROUP, stride_qh, stride_doh, T_PAD, LSE, Delta, stride_qm,
                     stride_dom, start_n, lo, hi, Tq, Tk, qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh,
                     dropout_p, dropout_scale, MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                     WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                     WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """_dkdv_tile_loop over the tiles lo..hi of all GROUP query heads (g, from bh on) sharing the kv head, in one
    flat loop: a loop over the heads around the tile loops kept the all-options backward at 255 registers with
    136 B of spills; flat, 249 and none (bench/results/NOTES.md, session 32)."""
    first_q, last_q = _key_side_bounds(start_n, lo_off, hi_off, BLOCK_N)
    n_tiles = tl.cdiv(hi - lo, BLOCK_M)
    g = 0
    start_m = lo
    for _ in range(0, GROUP * n_tiles):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _head_load(q_heads, g, start_m, Tq, stride_qh, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        do = _head_load(do_heads, g, start_m, Tq, stride_doh, stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        lse = tl.load(LSE + g * T_PAD + offs_m)
        delta = tl.load(Delta + g * T_PAD + offs_m)
        dk, dv = _dkdv_tile(dk, dv, k, v, q, do, lse, delta, start_m, offs_m, start_n, first_q, last_q, qk_scale,
                            cap_in, cap_out, seed, bh + g, dropout_p, dropout_scale, MASK, WINDOW_LEFT, WINDOW_RIGHT,
                            SOFTCAP, DROPOUT, WITH_DK, WITH_DV, BLOCK_N, BLOCK_M)
        start_m += BLOCK_M  # the next tile, or the first of the next head
        wrap = (start_m >= hi).to(tl.int32)
        g += wrap
        start_m -= wrap * (n_tiles * BLOCK_M)
    return dk, dv


@triton.jit
def _dq_tile_loop(dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, start_m, lo, hi, Tk,
                  qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                  MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                  SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of the BLOCK_M queries at start_m over key tiles lo..hi.

    MASK (a tile some query sees only in part): keys outside the window, and keys past Tk, get p = 0. Keys past
    Tk must be masked even though their k rows load as zeros: their score is 0, so p = 2^(-lse) overflows to
    inf when a row's scores are strongly negative, and inf * 0 in dS K is NaN."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        k = _load(k_src, start_n, Tk, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
        v = _load(v_src, start_n, Tk, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP:
            s, t = _capped(qk, cap_in, cap_out, SOFTCAP)
            p = tl.math.exp2(s - lse[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], Tk, lo_off, hi_off, WINDOW_LEFT,
                                  WINDOW_RIGHT), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dkdv_walk(dk, dv, k, v, Q, DO, LSE, Delta, b, hk, H, GROUP, stride_qb, stride_qh, stride_qm, stride_dob,
               stride_doh, stride_dom, T_PAD, start, Tq, Tk, qk_scale, cap_in, cap_out, lo_off, hi_off, seed,
               dropout_p, dropout_scale, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, GQA: tl.constexpr, WITH_DK: tl.constexpr,
               WITH_DV: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr,
               BLOCK_WALK: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK and/or dV (WITH_DK, WITH_DV) of the BLOCK_OWN keys at start, k and v loaded: the walk over every query
    tile of the GROUP query heads that sees them."""
    last_n = tl.minimum(start + BLOCK_OWN, Tk) - 1
    # query i sees key j for j - hi_off <= i <= j - lo_off: [a, b) cut by the causal diagonal / right side
    # (masked), [b, c) whole, [c, e) cut by the window's left side (masked)
    a, b_, c, e = _walk_ranges(start, last_n, Tq, -hi_off, -lo_off, WINDOW_RIGHT, WINDOW_LEFT, False,
                               BLOCK_WALK)
    if GQA:  # one flat walk over the group's query heads (GQA is GROUP > 1, a constexpr)
        bh0 = b * H + hk * GROUP
        q_heads = _heads_source(Q + b * stride_qb + hk * GROUP * stride_qh, GROUP, stride_qh, Tq, stride_qm,
                                HEAD_DIM, BLOCK_WALK, BLOCK_D, USE_TMA)
        do_heads = _heads_source(DO + b * stride_dob + hk * GROUP * stride_doh, GROUP, stride_doh, Tq,
                                 stride_dom, HEAD_DIM, BLOCK_WALK, BLOCK_D, USE_TMA)
        lse_0 = LSE + bh0 * T_PAD
        delta_0 = Delta + bh0 * T_PAD
        if WINDOW_RIGHT:
            dk, dv = _dkdv_group_walk(dk, dv, k, v, q_heads, do_heads, GROUP, stride_qh, stride_doh, T_PAD,
                                      lse_0, delta_0, stride_qm, stride_dom, start, a, b_, Tq, Tk, qk_scale,
                                      cap_in, cap_out, lo_off, hi_off, seed, bh0, dropout_p, dropout_scale,
                                      True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, WITH_DK, WITH_DV, USE_TMA,
                                      HEAD_DIM, BLOCK_OWN, BLOCK_WALK, BLOCK_D)
        dk, dv = _dkdv_group_walk(dk, dv, k, v, q_heads, do_heads, GROUP, stride_qh, stride_doh, T_PAD, lse_0,
                                  delta_0, stride_qm, stride_dom, start, b_, c, Tq, Tk, qk_scale, cap_in,
                                  cap_out, lo_off, hi_off, seed, bh0, dropout_p, dropout_scale, False,
                                  WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, WITH_DK, WITH_DV, USE_TMA, HEAD_DIM,
                                  BLOCK_OWN, BLOCK_WALK, BLOCK_D)
        if WINDOW_LEFT:
            dk, dv = _dkdv_group_walk(dk, dv, k, v, q_heads, do_heads, GROUP, stride_qh, stride_doh, T_PAD,
                                      lse_0, delta_0, stride_qm, stride_dom, start, c, e, Tq, Tk, qk_scale,
                                      cap_in, cap_out, lo_off, hi_off, seed, bh0, dropout_p, dropout_scale,
                                      True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, WITH_DK, WITH_DV, USE_TMA,
                                      HEAD_DIM, BLOCK_OWN, BLOCK_WALK, BLOCK_D)
    else:  # one query head per kv head: GROUP is the constant 1. (The loop is correct for any GROUP: the walk
        # the flat one replaced, kept so that a GPU can time both; and its one-trip form compiles 4
        # instructions per dkdv iteration shorter than the same code without it: NOTES.md, session 32)
        for g in range(0, GROUP):
            bh = b * H + hk * GROUP + g
            h = bh % H
            q_walk = _source(Q + b * stride_qb + h * stride_qh, Tq, stride_qm, HEAD_DIM, BLOCK_WALK, BLOCK_D,
                             USE_TMA)
            do_walk = _source(DO + b * stride_dob + h * stride_doh, Tq, stride_dom, HEAD_DIM, BLOCK_WALK,
                              BLOCK_D, USE_TMA)
            lse_h = LSE + bh * T_PAD  # both padded to T_PAD rows (zeros past Tq): whole tiles load unmasked
            delta_h = Delta + bh * T_PAD
            if WINDOW_RIGHT:
                dk, dv = _dkdv_tile_loop(dk, dv, k, v, q_walk, do_walk, lse_h, delta_h, stride_qm, stride_dom,
                                         start, a, b_, Tq, Tk, qk_scale, cap_in, cap_out, lo_off, hi_off, seed,
                                         bh, dropout_p, dropout_scale, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP,
                                         DROPOUT, WITH_DK, WITH_DV, USE_TMA, HEAD_DIM, BLOCK_OWN, BLOCK_WALK, BLOCK_D)
            dk, dv = _dkdv_tile_loop(dk, dv, k, v, q_walk, do_walk, lse_h, delta_h, stride_qm, stride_dom, start,
                                     b_, c, Tq, Tk, qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh,
                                     dropout_p, dropout_scale, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP,
                                     DROPOUT, WITH_DK, WITH_DV, USE_TMA, HEAD_DIM, BLOCK_OWN, BLOCK_WALK, BLOCK_D)
            if WINDOW_LEFT:
                dk, dv = _dkdv_tile_loop(dk, dv, k, v, q_walk, do_walk, lse_h, delta_h, stride_qm, stride_dom,
                                         start, c, e, Tq, Tk, qk_scale, cap_in, cap_out, lo_off, hi_off, seed,
                                         bh, dropout_p, dropout_scale, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP,
                                         DROPOUT, WITH_DK, WITH_DV, USE_TMA, HEAD_DIM, BLOCK_OWN, BLOCK_WALK, BLOCK_D)
    return dk, dv


@triton.jit
def _attn_bwd(Q, K, V, DO, DQ, DK, DV, LSE, Delta, Seed, sm_scale, dropout_p, softcap,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
              stride_dqb, stride_dqh, stride_dqm, stride_dkb, stride_dkh, stride_dkn,
              stride_dvb, stride_dvh, stride_dvn,
              H, GROUP, Tq, Tk, lo_off, hi_off, T_PAD, T_BUCKET,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
              GQA: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr,
              BLOCK_WALK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (n, kv head): dK/dV of keys n*BLOCK_OWN.. summed over the GROUP query heads that share the kv head
    (walking query tiles of BLOCK_WALK), then dQ of queries n*BLOCK_OWN.. of each of those heads (walking key
    tiles of BLOCK_WALK). The GQA sum runs inside one program: no atomics, deterministic."""
    start = tl.program_id(0) * BLOCK_OWN
    bhk = tl.program_id(1).to(tl.int64)
    H_KV = H // GROUP
    b, hk = bhk // H_KV, bhk % H_KV
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    qk_scale = sm_scale * LOG2E
    cap_in = sm_scale / softcap
    cap_out = softcap * LOG2E
    dropout_scale = 1.0 / (1.0 - dropout_p)
    seed = tl.load(Seed)

    if start < Tk:  # dK/dV of the owned key block
        k_own = _source(K, Tk, stride_kn, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
        v_own = _source(V, Tk, stride_vn, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
        k = _load(k_own, start, Tk, stride_kn, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
        v = _load(v_own, start, Tk, stride_vn, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
        dk = tl.zeros((BLOCK_OWN, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_OWN, BLOCK_D), dtype=tl.float32)
        # dK and dV in one walk; from SPLIT_DKDV_FROM on (dK and dV of 64 keys x 256 columns in fp32 are 256
        # registers per thread on 4 warps, over the limit) dV walks first (S^T, P^T dO) and is stored before dK
        # walks (S^T again, dP^T, dS^T Q): 1.25x the MMA work, one accumulator live at a time, no spill in the
        # loops (bench/results/NOTES.md, session 33)
        SPLIT: tl.constexpr = BLOCK_D >= SPLIT_DKDV_FROM
        dk, dv = _dkdv_walk(dk, dv, k, v, Q, DO, LSE, Delta, b, hk, H, GROUP, stride_qb, stride_qh, stride_qm,
                            stride_dob, stride_doh, stride_dom, T_PAD, start, Tq, Tk, qk_scale, cap_in, cap_out,
                            lo_off, hi_off, seed, dropout_p, dropout_scale, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP,
                            DROPOUT, GQA, not SPLIT, True, USE_TMA, HEAD_DIM, BLOCK_OWN, BLOCK_WALK, BLOCK_D)
        if SPLIT:
            _store_rows(DV + b * stride_dvb + hk * stride_dvh, start, dv.to(DV.dtype.element_ty), Tk, stride_dvn,
                        HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
            dk, dv = _dkdv_walk(dk, dv, k, v, Q, DO, LSE, Delta, b, hk, H, GROUP, stride_qb, stride_qh, stride_qm,
                                stride_dob, stride_doh, stride_dom, T_PAD, start, Tq, Tk, qk_scale, cap_in,
                                cap_out, lo_off, hi_off, seed, dropout_p, dropout_scale, WINDOW_LEFT,
                                WINDOW_RIGHT, SOFTCAP, DROPOUT, GQA, True, False, USE_TMA, HEAD_DIM, BLOCK_OWN,
                                BLOCK_WALK, BLOCK_D)
        _store_rows(DK + b * stride_dkb + hk * stride_dkh, start, (dk * sm_scale).to(DK.dtype.element_ty), Tk,
                    stride_dkn, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
        if not SPLIT:  # after dK, in the order the fused walk always stored them (the same code as before the split)
            _store_rows(DV + b * stride_dvb + hk * stride_dvh, start, dv.to(DV.dtype.element_ty), Tk, stride_dvn,
                        HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)

    if start < Tq:  # dQ of the owned query block, for each query head of the group
        k_walk = _source(K, Tk, stride_kn, HEAD_DIM, BLOCK_WALK, BLOCK_D, USE_TMA)
        v_walk = _source(V, Tk, stride_vn, HEAD_DIM, BLOCK_WALK, BLOCK_D, USE_TMA)
        offs_m = start + tl.arange(0, BLOCK_OWN)
        last_m = tl.minimum(start + BLOCK_OWN, Tq) - 1
        a, b_, c, e = _walk_ranges(start, last_m, Tk, lo_off, hi_off, WINDOW_LEFT, WINDOW_RIGHT, True, BLOCK_WALK)
        for g in range(0, GROUP):
            bh = b * H + hk * GROUP + g
            h = bh % H
            q_own = _source(Q + b * stride_qb + h * stride_qh, Tq, stride_qm, HEAD_DIM, BLOCK_OWN, BLOCK_D,
                            USE_TMA)
            do_own = _source(DO + b * stride_dob + h * stride_doh, Tq, stride_dom, HEAD_DIM, BLOCK_OWN, BLOCK_D,
                             USE_TMA)
            q = _load(q_own, start, Tq, stride_qm, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
            do = _load(do_own, start, Tq, stride_dom, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)
            lse = tl.load(LSE + bh * T_PAD + offs_m)
            delta = tl.load(Delta + bh * T_PAD + offs_m)
            dq = tl.zeros((BLOCK_OWN, BLOCK_D), dtype=tl.float32)
            if WINDOW_LEFT:
                dq = _dq_tile_loop(dq, q, do, lse, delta, k_walk, v_walk, stride_kn, stride_vn, start, a, b_, Tk,
                                   qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                                   True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, USE_TMA, HEAD_DIM,
                                   BLOCK_OWN, BLOCK_WALK, BLOCK_D)
            dq = _dq_tile_loop(dq, q, do, lse, delta, k_walk, v_walk, stride_kn, stride_vn, start, b_, c, Tk,
                               qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                               False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, USE_TMA, HEAD_DIM, BLOCK_OWN,
                               BLOCK_WALK, BLOCK_D)
            dq = _dq_tile_loop(dq, q, do, lse, delta, k_walk, v_walk, stride_kn, stride_vn, start, c, e, Tk,
                               qk_scale, cap_in, cap_out, lo_off, hi_off, seed, bh, dropout_p, dropout_scale,
                               True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, DROPOUT, USE_TMA, HEAD_DIM, BLOCK_OWN,
                               BLOCK_WALK, BLOCK_D)
            _store_rows(DQ + b * stride_dqb + h * stride_dqh, start, (dq * sm_scale).to(DQ.dtype.element_ty), Tq,
                        stride_dqm, HEAD_DIM, BLOCK_OWN, BLOCK_D, USE_TMA)


@triton.jit
def _dropout_mask_kernel(Out, Seed, dropout_p, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    start_n = tl.program_id(1) * BLOCK_N
    bh = tl.program_id(2).to(tl.int64)
    keep = _keep(tl.load(Seed), bh, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    tl.store(Out + (bh * Tq + offs_m[:, None]) * Tk + offs_n[None, :], keep.to(tl.int8), mask=mask)


# ------------------------------------------------------------------------------------------------
# launch configuration. The GPU lists are what the autotuner chooses from; each entry names the BLOCK_Ds it is
# shipped for (a config leaves a head dim's list when its compiled code spills or leaves the tensor cores there:
# bench/results/NOTES.md). The interpreter runs one small config (speed there is meaningless).

ALL_BLOCK_DS = (16, 32, 64, 128, 256)
UP_TO_128 = (16, 32, 64, 128)
# An entry: its block sizes, num_warps, num_stages, the BLOCK_Ds it is shipped for, and `skip`: the BLOCK_Ds it is
# not shipped for under a condition ("sm_80": on GPUs before Hopper, which take the pointer path and mma.sync;
# "sm_90": on Hopper and later; "dropout" / "no_dropout": with or without dropout; "a+b": both), because its compiled
# code spills there or does more work per tile than another config (bench/results/NOTES.md has the numbers).
# The lists are clean (0 spill bytes; wgmma only on sm_90) when compiled by Triton 3.9. Triton 3.6 (the GPU
# machine's version) spills more: the forward's M128N64/4w at BLOCK_D=128 spills 32-72 B there, so it is not shipped;
# the backward's BLOCK_D=128 configs spill 16-40 B in 3.6, all of it outside the main loops (bench/sass_loops.py
# finds no local load/store inside them), which is kept.
# forward: (BLOCK_M queries owned, BLOCK_N keys per step, num_warps, num_stages, block_ds, skip). With dropout at
# BLOCK_D=128 the mask's interleave needs shared memory and registers: M128 with 4 warps spills and M128N128
# outgrows shared memory. BLOCK_D=256 has its own entries, 2 stages (K and V tiles of 256 columns): all four are
# clean on sm_90; on sm_80 (255 registers everywhere) M64N64 is clean without dropout and M64N32 spills least
# (40 B) with it.
_FWD = [(128, 64, 4, 3, (16, 32, 64), {"dropout": (64,)}),
        (128, 64, 8, 3, UP_TO_128, {"sm_80": (128,)}),
        (128, 128, 8, 3, UP_TO_128, {"sm_80": (128,), "dropout": (128,), "sm_80+dropout": (64,)}),
        (64, 64, 4, 3, UP_TO_128, {"sm_80+dropout": (64,)}),
        (128, 32, 4, 4, UP_TO_128, {"sm_80": (64, 128), "dropout": (128,)}), (64, 32, 4, 4, UP_TO_128, {}),
        (64, 32, 4, 2, (256,), {"sm_80+no_dropout": (256,)}), (64, 64, 4, 2, (256,), {"sm_80+dropout": (256,)}),
        (128, 32, 8, 2, (256,), {"sm_80": (256,)}), (128, 64, 8, 2, (256,), {"sm_80": (256,)})]
# backward: (BLOCK_OWN keys and queries owned, BLOCK_WALK rows per step, num_warps, num_stages, block_ds, skip).
# Every config gives each warpgroup (4 warps) BLOCK_OWN/warpgroups >= 64 rows of its own: a warpgroup owning
# fewer would compute the same S^T/dP^T tiles as its neighbour (the old 64-owned-row 8-warp configs issued 1.5-1.67x
# the needed MMA FLOPs on sm_90). Walking 64 rows halves the per-iteration overhead per score (the lse/delta rows
# are padded, so their loads are unmasked, and the S^T and dP^T tiles fit); at BLOCK_D=128 the dK and dV
# accumulators of 128 owned rows need two warpgroups (8 warps), and with dropout the mask's registers shrink the
# walk to 16. On sm_90 at BLOCK_D=64 without dropout only the config within the per-tile budget (<= 4,900
# warp-instructions per 128x64 score tile in the main loops: bench/sass_loops.py) is shipped. sm_80 (mma.sync, no
# TMA) spills with the wide walks at BLOCK_D=64 and with 8 warps at BLOCK_D=128: there it keeps 64x32 on 4 warps.
# With dropout on sm_90, 64x64/4w at BLOCK_D=64 sits at 255 registers and spills 16 B causal (since the window
# masks of session 30): not shipped there; 128x64/8w and 64x32/4w are clean.
# BLOCK_D=256 walks dV and dK one after the other (see _attn_bwd: fused, dK and dV of 64 rows x 256 columns in fp32
# are 256 registers per thread on 4 warps, and every config spilled, up to 1,032 B with local accesses inside the
# loops). Split, on sm_90, without dropout 64x32/4w and 128x32/8w are clean; with dropout, whose mask takes
# registers, 64x16/4w (16 B) and 128x16/8w (24 B) spill outside the loops only, where the walk of 32 has local
# accesses inside them. Two warpgroups owning 64 rows would compute the same S^T/dP^T tiles (Triton puts a chained
# dot's warps along M). On sm_80 (mma.sync) 64x32/8w is clean (24 B with dropout) though its warps repeat part of
# the score tiles (1.5x); 4 warps spill 416 B there. bench/results/NOTES.md, session 33.
_BWD = [(64, 64, 4, 3, (16, 32, 64), {"sm_80": (64,), "sm_90+dropout": (64,)}),
        (128, 64, 8, 3, (16, 32, 64), {"sm_90+no_dropout": (64,), "sm_80+dropout": (64,)}),
        (64, 32, 4, 3, UP_TO_128, {"sm_90+dropout": (128,), "sm_90+no_dropout": (64,)}),
        (128, 32, 8, 3, (128,), {"dropout": (128,), "sm_80": (128,)}),
        (128, 16, 8, 3, (128,), {"no_dropout": (128,), "sm_80": (128,)}),
        (64, 32, 4, 2, (256,), {"dropout": (256,), "sm_80": (256,)}),
        (128, 32, 8, 2, (256,), {"dropout": (256,), "sm_80": (256,)}),
        (64, 16, 4, 2, (256,), {"no_dropout": (256,), "sm_80": (256,)}),
        (128, 16, 8, 2, (256,), {"no_dropout": (256,), "sm_80": (256,)}), (64, 32, 8, 2, (256,), {"sm_90": (256,)})]
FWD_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, block_ds=ds, skip=skip)
               for m, n, w, s, ds, skip in _FWD]
BWD_CONFIGS = [dict(BLOCK_OWN=o, BLOCK_WALK=k, num_warps=w, num_stages=s, block_ds=ds, skip=skip)
               for o, k, w, s, ds, skip in _BWD]
INTERPRETER_FWD_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, block_ds=ALL_BLOCK_DS)
INTERPRETER_BWD_CONFIG = dict(BLOCK_OWN=32, BLOCK_WALK=16, num_warps=4, num_stages=1, block_ds=ALL_BLOCK_DS)
PREPROCESS_CONFIG = dict(BLOCK_M=64, num_warps=4, num_stages=1)  # delta = rowsum(dO * O): no dot
# the backward's lse and delta rows are padded to a multiple of ROW_PAD, which every BLOCK_OWN and BLOCK_WALK and
# the preprocess's BLOCK_M divide: no tile reads past the padding
ROW_PAD = 128
BLOCK_KEYS = {"fwd": ("BLOCK_M", "BLOCK_N"), "bwd": ("BLOCK_OWN", "BLOCK_WALK")}


def _check_block_shapes(kind, configs):
    """The causal diagonal starts at a multiple of the owned block and is walked in steps of the other one, and
    a dropout tile draws four keys per Philox call: the owned block must be a multiple of the step, both of 16."""
    own, walk = BLOCK_KEYS[kind]
    for c in configs:
        if c[own] % c[walk] or c[walk] % 16 or set(c["block_ds"]) - set(ALL_BLOCK_DS) or \
                (kind == "bwd" and ROW_PAD % c[own]):
            raise ValueError(f"attention: {kind} config {c} breaks the kernel's block-shape invariant: {own} must "
                             f"be a multiple of {walk}, {walk} of 16, block_ds a subset of {ALL_BLOCK_DS}, and the "
                             f"backward's {own} a divisor of ROW_PAD={ROW_PAD}")


def _check_coverage(kind, configs):
    """Every (BLOCK_D, dropout, arch) keeps at least one GPU config after the skips."""
    for block_d in ALL_BLOCK_DS:
        for dropout in (False, True):
            for arch in ("sm_90", "sm_80"):
                if not configs_for(configs, block_d, dropout, arch):
                    raise ValueError(f"attention: no {kind} config is shipped for BLOCK_D={block_d}, "
                                     f"dropout={dropout} on {arch}")


_check_block_shapes("fwd", FWD_CONFIGS + [INTERPRETER_FWD_CONFIG])
_check_block_shapes("bwd", BWD_CONFIGS + [INTERPRETER_BWD_CONFIG])


def configs_for(configs, block_d, dropout=False, arch="sm_90"):
    """The entries of a config list shipped for this BLOCK_D, with or without dropout, on `arch` ("sm_90": Hopper
    and later, "sm_80": earlier GPUs): what the autotuner may choose on a GPU."""
    conditions = {"dropout" if dropout else "no_dropout", arch}

    def skipped(c):
        return any(block_d in ds and set(cond.split("+")) <= conditions for cond, ds in c.get("skip", {}).items())

    return [c for c in configs if block_d in c["block_ds"] and not skipped(c)]


_check_coverage("fwd", FWD_CONFIGS)
_check_coverage("bwd", BWD_CONFIGS)


# "fwd" or "bwd" -> the config entry every launch of it must use (set by `forced_configs`, for tests)
_FORCED = {}


@contextlib.contextmanager
def forced_configs(**entries):
    """For tests: launch with the given config entries (fwd=, bwd=: entries of FWD_CONFIGS, BWD_CONFIGS) instead
    of the autotuner's choice, under the interpreter too; the others keep theirs. tests/test_kernel_configs.py
    runs every GPU config on the CPU this way."""
    tuned = {"fwd": _attn_fwd_tuned, "bwd": _attn_bwd_tuned}
    unknown = set(entries) - set(tuned)
    if unknown:
        raise ValueError(f"forced_configs: unknown kernel(s) {sorted(unknown)}; choose from {sorted(tuned)}")
    for name in entries:
        tuned[name].cache.clear()  # the autotuner remembers its choice per key: forget it
    _FORCED.update(entries)
    try:
        yield
    finally:
        for name in entries:
            _FORCED.pop(name, None)
            tuned[name].cache.clear()


def _autotuned(fn, kind, configs, interpreter_config):
    """fn autotuned over `configs`, pruned per BLOCK_D at launch; the interpreter gets its one config."""
    keys = BLOCK_KEYS[kind]

    def triton_config(c):
        return triton.Config({k: c[k] for k in keys}, num_warps=c["num_warps"], num_stages=c["num_stages"])

    def ident(c):
        return tuple(c[k] for k in keys) + (c["num_warps"], c["num_stages"])

    def prune(triton_configs, named_args, **kwargs):
        if kind in _FORCED:
            return [triton_config(_FORCED[kind])]
        if interpreting():
            return [triton_config(interpreter_config)]
        args = {**named_args, **kwargs}
        block_d, dropout, arch = args["BLOCK_D"], args["DROPOUT"], arch_of(args["Q"].device)
        allowed = [ident(c) for c in configs_for(configs, block_d, dropout, arch)]
        kept = [t for t in triton_configs
                if tuple(t.kwargs[k] for k in keys) + (t.num_warps, t.num_stages) in allowed]
        if not kept:
            raise ValueError(f"attention: no launch config is shipped for BLOCK_D={block_d}, dropout={dropout} "
                             f"on {arch}")
        return kept

    # T_BUCKET: the sequence length rounded up to a power of two, so a KV-cache prefill of every prompt length
    # does not re-tune; dtype is part of Triton's own key
    return triton.autotune([triton_config(c) for c in configs], key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": prune})(fn)


_AUTOTUNE_KEY = ["T_BUCKET", "BLOCK_D", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "DROPOUT", "USE_TMA"]
_attn_fwd_tuned = _autotuned(_attn_fwd, "fwd", FWD_CONFIGS, INTERPRETER_FWD_CONFIG)
_attn_bwd_tuned = _autotuned(_attn_bwd, "bwd", BWD_CONFIGS, INTERPRETER_BWD_CONFIG)


def _t_bucket(Tq, Tk):
    return triton.next_power_of_2(max(Tq, Tk))


def _t_pad(Tq):
    """The backward's lse/delta row length: Tq rounded up to ROW_PAD (every backward tile divides it)."""
    return triton.cdiv(Tq, ROW_PAD) * ROW_PAD


def _draw_seed(device, dropout_p):
    """The dropout seed as a one-element int64 tensor on the inputs' device, drawn from torch's generator for that
    device: no host sync, and a CUDA-graph replay draws a new one."""
    if dropout_p == 0.0:
        return torch.zeros(1, dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------------
# custom ops


def _mask_args(Tq, Tk, causal, window_left, window_right):
    """The kernels' window constexprs and offsets: query i sees key j when lo_off <= j - i <= hi_off, the window
    aligned bottom-right (query i sits at key position i + Tk - Tq, as in FlashAttention); -1 leaves a side
    unbounded, causal bounds the right side at 0."""
    offset = Tk - Tq
    right = 0 if causal else window_right
    return dict(WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=right >= 0, lo_off=offset - max(window_left, 0),
                hi_off=offset + max(right, 0))


@torch.library.custom_op("nanogpt_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float,
                      scale: float, softcap: float, window_left: int,
                      window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    seed = _draw_seed(q.device, dropout_p)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_tuned[grid](q, k, v, o, lse, seed, scale, dropout_p, softcap or 1.0,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                          H, H // H_kv, Tq, Tk, T_BUCKET=_t_bucket(Tq, Tk),
                          **_mask_args(Tq, Tk, causal, window_left, window_right),
                          SOFTCAP=softcap_mode(softcap, q.dtype), DROPOUT=dropout_p > 0.0, USE_TMA=use_tma(q, k, v, o),
                          HEAD_DIM=D, BLOCK_D=block_d_of(D))
    return o, lse, seed


@_attention_fwd_op.register_fake
def _(q, k, v, causal, dropout_p, scale, softcap, window_left, window_right):
    B, H, Tq, D = q.shape
    return (q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32),
            q.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("nanogpt_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, seed: torch.Tensor, causal: bool, dropout_p: float, scale: float,
                      softcap: float, window_left: int,
                      window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    t_pad = _t_pad(Tq)
    delta = torch.empty((B, H, t_pad), dtype=torch.float32, device=q.device)
    lse_pad = torch.empty((B, H, t_pad), dtype=torch.float32, device=q.device)
    block_d = block_d_of(D)
    pre = PREPROCESS_CONFIG
    _attn_bwd_preprocess[(t_pad // pre["BLOCK_M"], B * H)](
        o, do, lse, lse_pad, delta, *o.stride()[:3], *do.stride()[:3], H, Tq, t_pad, HEAD_DIM=D,
        BLOCK_M=pre["BLOCK_M"], BLOCK_D=block_d, num_warps=pre["num_warps"], num_stages=pre["num_stages"])
    # one program per (block, kv head): it sums dK/dV over the kv head's query heads itself
    grid = lambda meta: (triton.cdiv(max(Tq, Tk), meta["BLOCK_OWN"]), B * H_kv)  # noqa: E731
    _attn_bwd_tuned[grid](
        q, k, v, do, dq, dk, dv, lse_pad, delta, seed, scale, dropout_p, softcap or 1.0,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, H // H_kv, Tq, Tk, T_PAD=t_pad, T_BUCKET=_t_bucket(Tq, Tk),
        **_mask_args(Tq, Tk, causal, window_left, window_right), SOFTCAP=softcap_mode(softcap, q.dtype),
        DROPOUT=dropout_p > 0.0, GQA=H != H_kv, USE_TMA=use_tma(q, k, v, do, dq, dk, dv), HEAD_DIM=D, BLOCK_D=block_d)
    return dq, dk, dv


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, causal, dropout_p, scale, softcap, window_left, window_right):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, *ctx.options = inputs  # causal, dropout_p, scale, softcap, window_left, window_right
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, seed)


def _backward(ctx, do, _dlse, _dseed):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, seed, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, causal, dropout_p, scale, softcap):
    check_qkv("attention", q, k, v, "must be (B, H_kv, Tk, D) with q's B and D, H_kv dividing q's H")
    B, H, Tq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} is not supported; supported: multiples of 8 from 8 to "
                         f"{HEAD_DIMS[-1]}")
    if causal and k.shape[2] < Tq:
        raise ValueError(f"attention: causal attention needs at least as many keys as queries (the mask is "
                         f"aligned bottom-right, as in FlashAttention), got Tq={Tq}, Tk={k.shape[2]}")
    if Tq == 0 or k.shape[2] == 0:
        raise ValueError("attention: sequences must have at least one position")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p={dropout_p} must be in [0, 1)")
    if scale is not None and not scale > 0.0:
        raise ValueError(f"attention: scale={scale} must be positive (the kernels fold it into the row maximum)")
    check_softcap("attention", softcap)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name} must be contiguous in its last (head) dimension; call "
                             f".contiguous() on it")
    check_device("attention", q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, dropout_p: float = 0.0,
              scale: float | None = None, *, softcap: float | None = None,
              window: tuple[int | None, int | None] | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v with dropout on the attention weights, fused.

    The same function as F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p,
    scale=scale, enable_gqa=True) for scale > 0, with two of FlashAttention's options:
    - q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with H_kv dividing H (GQA; H_kv = 1 is MQA): query head h reads
      kv head h // (H / H_kv), k and v are never repeated in memory;
    - causal with Tq <= Tk is aligned bottom-right: query i sees keys j <= i + Tk - Tq (a continuation's prefill
      over a KV cache, or a chunk of queries at the end of the keys);
    - softcap: scores become softcap * tanh(score / softcap) (Gemma 2), before the mask;
    - window=(left, right): query i sees keys i + Tk - Tq - left .. i + Tk - Tq + right (-1 or None: unbounded;
      causal caps right at 0); key tiles wholly outside it are never visited (`window_tiles` counts them).
    A query that sees no key outputs 0. Any strides with a contiguous last dimension (the model's
    (B, T, H, D).transpose(1, 2) views are read in place); D a multiple of 8 up to 256; float32, float16 or
    bfloat16, fp32 accumulation, output in the input dtype."""
    _check_inputs(q, k, v, causal, dropout_p, scale, softcap)
    left, right = window_sides("attention", window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _attention_fwd_op(q, k, v, bool(causal), float(dropout_p), float(scale), float(softcap or 0.0), left,
                             right)[0]


def window_tiles(Tq: int, Tk: int, causal: bool = True, window=None, block_m: int | None = None,
                 block_n: int | None = None) -> dict:
    """The forward's (query block, key tile) pairs for one head: {"total", "visited", "skipped"}, where skipped
    tiles (above the causal diagonal, outside the window) are never loaded. The same tile ranges the kernel
    computes (_walk_ranges), for a config's BLOCK_M x BLOCK_N (default: the interpreter's)."""
    block_m = block_m or INTERPRETER_FWD_CONFIG["BLOCK_M"]
    block_n = block_n or INTERPRETER_FWD_CONFIG["BLOCK_N"]
    left, right = window_sides("attention", window)
    m = _mask_args(Tq, Tk, causal, left, right)
    visited = 0
    for start in range(0, Tq, block_m):
        last = min(start + block_m, Tq) - 1
        a, e = 0, Tk
        if m["WINDOW_LEFT"]:
            a = max(start + m["lo_off"], 0) // block_n * block_n
        if m["WINDOW_RIGHT"]:
            e = min(Tk, last + m["hi_off"] + 1)
        visited += max(0, -(-(max(e, a) - a) // block_n))
    total = -(-Tq // block_m) * -(-Tk // block_n)
    return {"total": total, "visited": visited, "skipped": total - visited}


def dropout_mask(B: int, H: int, Tq: int, Tk: int, dropout_p: float, seed: int, device="cpu") -> torch.Tensor:
    """For tests: the (B, H, Tq, Tk) boolean keep-mask that the kernels use for this seed."""
    out = torch.empty((B * H, Tq, Tk), dtype=torch.int8, device=device)
    seed_tensor = torch.tensor([seed], dtype=torch.int64, device=device)
    grid = (triton.cdiv(Tq, 32), triton.cdiv(Tk, 32), B * H)
    _dropout_mask_kernel[grid](out, seed_tensor, dropout_p, Tq, Tk, BLOCK_M=32, BLOCK_N=32)
    return out.view(B, H, Tq, Tk).bool()


def last_seed_of(q, k, v, causal=True, dropout_p=0.0, scale=None):
    """For tests: run the forward op and return (output, the dropout seed it drew)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    o, _, seed = _attention_fwd_op(q, k, v, causal, dropout_p, scale, 0.0, -1, -1)
    return o, int(seed.item())


# ------------------------------------------------------------------------------------------------
# what `python -m kernels.inspect` compiles (the contract is described at the top of kernels/inspect.py)

# (dtype, head dim, causal, dropout[, options]): GPT-2's bf16 call (D=64) and D=128, causal or not, dropout off or
# on; a padded head dim (96 runs in BLOCK_D=128); fp16 (it compiles like bf16: two rows to show it); D=256 (its own
# configs); and the paths options add, at D=64 and 128: GQA (4 query heads per kv head: the backward's group loop),
# a sliding window (the left-side masked loops) and a softcap (tanh per score, its derivative in the backward)
OPTIONS = dict(group=4, window=256, softcap=30.0)
INSPECT_PROBLEMS = [(torch.bfloat16, d, causal, dropout) for d in (64, 128) for causal in (True, False)
                    for dropout in (False, True)]
INSPECT_PROBLEMS += [(torch.bfloat16, 96, True, False), (torch.float16, 64, True, False),
                     (torch.float16, 128, True, True)]
INSPECT_PROBLEMS += [(torch.bfloat16, 256, True, dropout) for dropout in (False, True)]
INSPECT_PROBLEMS += [(torch.bfloat16, d, True, False, OPTIONS) for d in (64, 128)]


def inspect_cases(problems=None, arch="sm_90"):
    """Every attention kernel x every launch config it can pick on a GPU x representative problems: GPT-2 124M's
    call (B=16, H=12, T=1024, q/k/v the (B, T, H, D).transpose(1, 2) views of c_attn's output), with the load
    path the launch picks on `arch` (TMA descriptors on sm_90, pointers on sm_80). With options, c_attn's output
    holds H query heads and H / group kv heads; the window is (window, 0)."""
    tma = arch_has_tma(arch)  # as use_tma decides on a GPU: TMA from Hopper (sm_90) on
    H, T = 12, 1024  # (B = 16 enters no stride nor size argument)
    cases = []
    for dtype, D, causal, dropout, *rest in problems or INSPECT_PROBLEMS:
        options = rest[0] if rest else {}
        group = options.get("group", 1)
        H_kv = H // group
        width = (H + 2 * H_kv) * D        # c_attn's output row: q, k, v heads side by side
        qkv = (T * width, D, width)      # strides (b, h, t) of the c_attn views
        dense = (H * T * D, T * D, D)    # a contiguous (B, H, T, D) tensor: o, dq
        dense_kv = (H_kv * T * D, T * D, D)  # dk, dv
        do = (T * H * D, D, H * D)       # the gradient of y.transpose(1, 2), as the model's backward hands it
        problem = {"dtype": DTYPE_NAMES[dtype], "head_dim": D, "causal": causal, "dropout": dropout}
        if options:
            problem["options"] = " ".join(f"{k}{v:g}" for k, v in options.items())
        block_d = block_d_of(D)
        common = dict(Seed=torch.int64, sm_scale=D ** -0.5, dropout_p=0.1 if dropout else 0.0,
                      softcap=options.get("softcap", 1.0))
        mask = _mask_args(T, T, causal, options.get("window", -1), -1)
        flags = dict(WINDOW_LEFT=mask.pop("WINDOW_LEFT"), WINDOW_RIGHT=mask.pop("WINDOW_RIGHT"),
                     SOFTCAP=softcap_mode(options.get("softcap"), dtype, interpreter=False), DROPOUT=dropout,
                     USE_TMA=tma, HEAD_DIM=D, BLOCK_D=block_d)
        sizes = dict(H=H, GROUP=group, Tq=T, Tk=T, **mask, T_BUCKET=_t_bucket(T, T))
        bwd_sizes = dict(sizes, T_PAD=_t_pad(T))
        for c in configs_for(FWD_CONFIGS, block_d, dropout, arch):
            cases.append(launch_case("attention_fwd", _attn_fwd, c, problem, dict(
                Q=dtype, K=dtype, V=dtype, O=dtype, LSE=torch.float32, **common,
                **_strides("q", qkv), **_strides("k", qkv), **_strides("v", qkv), **_strides("o", dense),
                **sizes, **flags)))
            cases[-1]["loops"] = _fwd_loops(c, block_d, flags["WINDOW_LEFT"])
        cases.append(launch_case("attention_bwd_preprocess", _attn_bwd_preprocess, PREPROCESS_CONFIG, problem, dict(
            O=dtype, DO=dtype, LSE=torch.float32, LSE_PAD=torch.float32, Delta=torch.float32,
            **_strides("o", dense), **_strides("do", do), H=H, Tq=T, T_PAD=_t_pad(T), HEAD_DIM=D,
            BLOCK_D=block_d)))
        for c in configs_for(BWD_CONFIGS, block_d, dropout, arch):
            cases.append(launch_case("attention_bwd", _attn_bwd, c, problem, dict(
                Q=dtype, K=dtype, V=dtype, DO=dtype, DQ=dtype, DK=dtype, DV=dtype, LSE=torch.float32,
                Delta=torch.float32, **common, **_strides("q", qkv), **_strides("k", qkv), **_strides("v", qkv),
                **_strides("do", do), **_strides("dq", dense), **_strides("dk", dense_kv),
                **_strides("dv", dense_kv), **bwd_sizes, **flags, GQA=group > 1)))
            cases[-1]["loops"] = _bwd_loops(c, block_d, flags["WINDOW_RIGHT"], flags["WINDOW_LEFT"])
    return cases


def _fwd_loops(c, block_d, window_left=False):
    """The forward's main loops for the cost model (the "loops" contract of kernels/inspect.py), in source order:
    with a window's left side the tiles it cuts (masked), the unmasked key tiles, then the masked ones (causal
    diagonal or the tail past Tk). Per iteration: S = Q K^T and O += P V, each 2*BLOCK_M*BLOCK_N*BLOCK_D FLOPs
    (BLOCK_D: a padded head dim counts as needed)."""
    tile = [c["BLOCK_M"], c["BLOCK_N"]]
    flops = 2 * 2 * c["BLOCK_M"] * c["BLOCK_N"] * block_d
    loops = [dict(name="fwd_window", masked=True, mma_flops=flops, tile=tile)] if window_left else []
    return loops + [dict(name="fwd", masked=False, mma_flops=flops, tile=tile),
                    dict(name="fwd_mask", masked=True, mma_flops=flops, tile=tile)]


def _bwd_loops(c, block_d, window_right, window_left=False):
    """The backward's main loops, in source order (see _attn_bwd). dkdv: S^T, dP^T, dV += P^T dO, dK += dS^T Q
    (4 dots); from SPLIT_DKDV_FROM on, a dV walk (S^T, dV += P^T dO: 2 dots) then a dK walk (S^T, dP^T,
    dK += dS^T Q: 3 dots, each needed by the walk that issues it); dq: S, dP, dQ += dS K (3 dots); each
    2*BLOCK_OWN*BLOCK_WALK*BLOCK_D FLOPs per iteration. Masked variants: the causal diagonal (window_right) and a
    window's left side."""
    tile = [c["BLOCK_OWN"], c["BLOCK_WALK"]]
    one = 2 * c["BLOCK_OWN"] * c["BLOCK_WALK"] * block_d

    def walk(name, dots):
        loops = [dict(name=f"{name}_diag", masked=True, mma_flops=dots * one, tile=tile)] if window_right else []
        loops += [dict(name=name, masked=False, mma_flops=dots * one, tile=tile)]
        return loops + ([dict(name=f"{name}_window", masked=True, mma_flops=dots * one, tile=tile)]
                        if window_left else [])
    loops = walk("dv", 2) + walk("dk", 3) if block_d >= SPLIT_DKDV_FROM else walk("dkdv", 4)
    dq = dict(mma_flops=3 * one, tile=tile)
    loops += [dict(name="dq_window", masked=True, **dq)] if window_left else []
    return loops + [dict(name="dq", masked=False, **dq), dict(name="dq_mask", masked=True, **dq)]


def _strides(name, strides):
    """{stride_<name>b: .., stride_<name>h: .., stride_<name>m or n: ..}, named as the kernels name them."""
    row = {"q": "m", "o": "m", "do": "m", "dq": "m"}.get(name, "n")
    return dict(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}{row}"), strides))
