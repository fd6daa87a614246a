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
with Z the dropout mask scaled by 1/(1-p). dK/dV accumulate in one program per key block over the query
blocks that see it; dQ in one program per query block over its key blocks: two passes, no atomics,
deterministic.

Dropout: the keep decision of element (b*h, i, j) is Philox(seed, (bh*Tq + i)*Tk + j) < 1-p, recomputed
identically in every pass, so the mask is never stored. The seed is drawn from torch's default generator:
torch.manual_seed makes a run reproducible.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from kernels._common import check_device, check_float, interpreting

HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)
# fp32 inputs are multiplied in full fp32 ("ieee"), not TF32, so float32 matches the reference to 1e-4;
# fp16/bf16 inputs are unaffected by this setting
PRECISION: tl.constexpr = tl.constexpr("ieee")


@triton.jit
def _keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p):
    """The dropout keep-mask of a (BLOCK_M, BLOCK_N) tile: one Philox draw per attention element."""
    elem = (bh * Tq + offs_m[:, None].to(tl.int64)) * Tk + offs_n[None, :]
    return tl.rand(seed, elem) >= dropout_p


@triton.jit
def _fwd_tile_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, Tq, Tk, D, qk_scale,
                   seed, bh, dropout_p, dropout_scale,
                   CAUSAL_MASK: tl.constexpr, TAIL_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # scores in log2 units
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if TAIL_MASK:
            qk = tl.where(offs_n[None, :] < Tk, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the normalizer counts every element, dropped or not
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p), p * dropout_scale, 0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])  # a new seed every call: no recompiles
def _attn_fwd(Q, K, V, O, LSE, seed, sm_scale, dropout_p,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              H, Tq, Tk, D,
              CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    dropout_scale = 1.0 / (1.0 - dropout_p)
    if CAUSAL:
        # keys below the query block: no mask. The diagonal block: causal mask (and the tail past Tk).
        acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d,
                                       0, start_m, Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale,
                                       False, False, DROPOUT, BLOCK_N)
        acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d,
                                       start_m, tl.minimum(start_m + BLOCK_M, Tk), Tq, Tk, D, qk_scale,
                                       seed, bh, dropout_p, dropout_scale, True, True, DROPOUT, BLOCK_N)
    else:
        full = (Tk // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d,
                                       0, full, Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale,
                                       False, False, DROPOUT, BLOCK_N)
        acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d,
                                       full, Tk, Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale,
                                       False, True, DROPOUT, BLOCK_N)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past Tq saw nothing: keep them finite
    acc = acc / l_i[:, None]
    tl.store(LSE + bh * Tq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Tq)
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                         H, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * Tq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Tq)


@triton.jit
def _dkdv_tile_loop(dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_dom, offs_n, offs_d, lo, hi,
                    Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale,
                    CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + offs_m, mask=offs_m < Tq, other=0.0)
        delta = tl.load(Delta + offs_m, mask=offs_m < Tq, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
        if DROPOUT:
            keep = _keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p)
            pd = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            pd = p
        dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])  # a new seed every call: no recompiles
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta, seed, sm_scale, dropout_p,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H, Tq, Tk, D,
                   CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += bh * Tq
    Delta += bh * Tq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dropout_scale = 1.0 / (1.0 - dropout_p)
    # Queries past Tq and keys past Tk need no mask here: their rows of q/do (or k/v) load as zeros, so
    # they add nothing to the key rows that are stored, and their own rows are never stored.
    if CAUSAL:
        # queries on the diagonal block see part of this key block (masked); queries below it see all of it
        diag_end = tl.minimum(start_n + BLOCK_N, Tq)
        dk, dv = _dkdv_tile_loop(dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_dom, offs_n, offs_d,
                                 start_n, diag_end, Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale,
                                 True, DROPOUT, BLOCK_M)
        dk, dv = _dkdv_tile_loop(dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_dom, offs_n, offs_d,
                                 diag_end, Tq, Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale,
                                 False, DROPOUT, BLOCK_M)
    else:
        dk, dv = _dkdv_tile_loop(dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_dom, offs_n, offs_d,
                                 0, Tq, Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale,
                                 False, DROPOUT, BLOCK_M)
    dk *= sm_scale
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile_loop(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, Tq, Tk, D,
                  qk_scale, seed, bh, dropout_p, dropout_scale,
                  CAUSAL_MASK: tl.constexpr, TAIL_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if TAIL_MASK:
            p = tl.where(offs_n[None, :] < Tk, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p), dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])  # a new seed every call: no recompiles
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta, seed, sm_scale, dropout_p,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 H, Tq, Tk, D,
                 CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    delta = tl.load(Delta + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dropout_scale = 1.0 / (1.0 - dropout_p)
    if CAUSAL:
        dq = _dq_tile_loop(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_d, 0, start_m,
                           Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale, False, False, DROPOUT, BLOCK_N)
        dq = _dq_tile_loop(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_d, start_m,
                           tl.minimum(start_m + BLOCK_M, Tk), Tq, Tk, D, qk_scale, seed, bh, dropout_p,
                           dropout_scale, True, True, DROPOUT, BLOCK_N)
    else:
        full = (Tk // BLOCK_N) * BLOCK_N
        dq = _dq_tile_loop(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_d, 0, full,
                           Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale, False, False, DROPOUT, BLOCK_N)
        dq = _dq_tile_loop(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_d, full, Tk,
                           Tq, Tk, D, qk_scale, seed, bh, dropout_p, dropout_scale, False, True, DROPOUT, BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["seed"])  # a new seed every call: no recompiles
def _dropout_mask_kernel(Out, seed, dropout_p, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64)
    keep = _keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p)
    mask = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    tl.store(Out + (bh * Tq + offs_m[:, None]) * Tk + offs_n[None, :], keep.to(tl.int8), mask=mask)


# ------------------------------------------------------------------------------------------------
# launch configuration. The GPU lists below are what the autotuner chooses from on a GPU; `python -m
# kernels.inspect` compiles every one of them for sm_90/sm_80 and tests/test_kernel_configs.py runs every one of
# them under the interpreter, both reading these lists. Under the interpreter a launch uses INTERPRETER_CONFIG
# (speed there is meaningless), chosen by the autotuner's pruning hook at launch time.
#
# Each entry: (BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_Ds it is shipped for). A config leaves the list for a
# head dim when `python -m kernels.inspect` shows it spilling or off the tensor cores there (see README, "Kernel
# inspection", and bench/results/inspect-sm_90.md).
ALL_BLOCK_DS = (16, 32, 64, 128)

_FWD = [(128, 64, 4, 3, ALL_BLOCK_DS), (128, 64, 8, 3, ALL_BLOCK_DS), (128, 128, 8, 3, ALL_BLOCK_DS),
        (64, 64, 4, 3, ALL_BLOCK_DS), (128, 32, 4, 4, ALL_BLOCK_DS), (64, 32, 4, 4, ALL_BLOCK_DS)]
# backward: (the block a program walks over, the block it owns): dK/dV programs own BLOCK_N keys and walk BLOCK_M
# queries; dQ programs own BLOCK_M queries and walk BLOCK_N keys
_BWD = [(32, 128, 8, 3, ALL_BLOCK_DS), (32, 64, 4, 3, ALL_BLOCK_DS), (64, 64, 4, 3, ALL_BLOCK_DS),
        (64, 128, 8, 2, ALL_BLOCK_DS)]
DKDV_CONFIGS = [dict(BLOCK_M=walk, BLOCK_N=own, num_warps=w, num_stages=s, block_ds=ds)
                for walk, own, w, s, ds in _BWD]
DQ_CONFIGS = [dict(BLOCK_M=own, BLOCK_N=walk, num_warps=w, num_stages=s, block_ds=ds)
              for walk, own, w, s, ds in _BWD]
FWD_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, block_ds=ds) for m, n, w, s, ds in _FWD]
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, block_ds=ALL_BLOCK_DS)
PREPROCESS_CONFIG = dict(BLOCK_M=64, num_warps=4, num_stages=1)  # delta = rowsum(dO * O): no dot, no pipelining


def _check_block_shapes(kernel, configs, multiple, of):
    """The loops step one block inside the other: the causal diagonal of the forward and dQ passes starts at a
    multiple of BLOCK_M and is walked in steps of BLOCK_N, so BLOCK_M must be a multiple of BLOCK_N there;
    dK/dV is the transpose."""
    for c in configs:
        if c[multiple] % c[of] or set(c["block_ds"]) - set(ALL_BLOCK_DS):
            raise ValueError(f"attention: {kernel} config {c} breaks the kernel's block-shape invariant: {multiple} "
                             f"must be a multiple of {of}, and block_ds a subset of {ALL_BLOCK_DS}")


_check_block_shapes("forward", FWD_CONFIGS + [INTERPRETER_CONFIG], "BLOCK_M", "BLOCK_N")
_check_block_shapes("dQ", DQ_CONFIGS + [INTERPRETER_CONFIG], "BLOCK_M", "BLOCK_N")
_check_block_shapes("dK/dV", DKDV_CONFIGS + [INTERPRETER_CONFIG], "BLOCK_N", "BLOCK_M")


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def configs_for(configs, block_d):
    """The entries of a config list shipped for this BLOCK_D (what the autotuner may choose on a GPU)."""
    return [c for c in configs if block_d in c["block_ds"]]


def _triton_config(c):
    return triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                         num_stages=c["num_stages"])


# "fwd", "dkdv" or "dq" -> the config entry every launch of it must use (set by `forced_configs`, for tests)
_FORCED = {}


@contextlib.contextmanager
def forced_configs(**entries):
    """For tests: launch with the given config entries (fwd=, dkdv=, dq=: entries of FWD_CONFIGS, DKDV_CONFIGS,
    DQ_CONFIGS) instead of the autotuner's choice, under the interpreter too; the others keep theirs.
    tests/test_kernel_configs.py runs every GPU config on the CPU this way."""
    tuned = {"fwd": _attn_fwd_tuned, "dkdv": _attn_bwd_dkdv_tuned, "dq": _attn_bwd_dq_tuned}
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


def _autotuned(name, fn, configs):
    """fn autotuned over `configs`, pruned per BLOCK_D at launch; the interpreter gets INTERPRETER_CONFIG."""
    def key(c):
        return c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]

    block_ds = {key(c): c["block_ds"] for c in configs}  # looked up at launch time

    def prune(triton_configs, named_args, **kwargs):
        if name in _FORCED:
            return [_triton_config(_FORCED[name])]
        if interpreting():
            return [_triton_config(INTERPRETER_CONFIG)]
        block_d = {**named_args, **kwargs}["BLOCK_D"]
        kept = [t for t in triton_configs
                if block_d in block_ds[key({**t.kwargs, "num_warps": t.num_warps, "num_stages": t.num_stages})]]
        if not kept:
            raise ValueError(f"attention: no launch config is shipped for BLOCK_D={block_d}")
        return kept

    return triton.autotune([_triton_config(c) for c in configs], key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": prune})(fn)


_AUTOTUNE_KEY = ["Tq", "Tk", "BLOCK_D", "CAUSAL", "DROPOUT"]  # dtype is part of Triton's own cache key
_attn_fwd_tuned = _autotuned("fwd", _attn_fwd, FWD_CONFIGS)
_attn_bwd_dkdv_tuned = _autotuned("dkdv", _attn_bwd_dkdv, DKDV_CONFIGS)
_attn_bwd_dq_tuned = _autotuned("dq", _attn_bwd_dq, DQ_CONFIGS)


def _draw_seed(dropout_p):
    if dropout_p == 0.0:
        return 0
    return int(torch.randint(0, 2**31 - 1, (1,)).item())  # torch's default CPU generator


# ------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("nanogpt_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    seed = _draw_seed(dropout_p)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_tuned[grid](q, k, v, o, lse, seed, scale, dropout_p,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                          H, Tq, Tk, D, CAUSAL=causal, DROPOUT=dropout_p > 0.0, BLOCK_D=_block_d(D))
    return o, lse, torch.tensor([seed], dtype=torch.int64)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, dropout_p, scale):
    B, H, Tq, D = q.shape
    return (q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32),
            torch.empty(1, dtype=torch.int64))


@torch.library.custom_op("nanogpt_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, seed: torch.Tensor, causal: bool, dropout_p: float,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    block_d = _block_d(D)
    pre = PREPROCESS_CONFIG
    _attn_bwd_preprocess[(triton.cdiv(Tq, pre["BLOCK_M"]), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq, D, BLOCK_M=pre["BLOCK_M"], BLOCK_D=block_d,
        num_warps=pre["num_warps"], num_stages=pre["num_stages"])
    seed_value = int(seed.item())
    dropout = dropout_p > 0.0
    common = (seed_value, scale, dropout_p, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, *common, *dk.stride()[:3], *dv.stride()[:3],
        H, Tq, Tk, D, CAUSAL=causal, DROPOUT=dropout, BLOCK_D=block_d)
    _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, *common, *dq.stride()[:3],
        H, Tq, Tk, D, CAUSAL=causal, DROPOUT=dropout, BLOCK_D=block_d)
    return dq, dk, dv


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, causal, dropout_p, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, dropout_p, scale = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale


def _backward(ctx, do, _dlse, _dseed):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, seed, ctx.causal, ctx.dropout_p, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, causal, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-d tensor (B, H, T, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        check_float("attention", name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (k and v must be (B, H, Tk, D) with q's B, H and D)")
    if D not in HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} is not supported; supported: "
                         f"{', '.join(map(str, HEAD_DIMS))}")
    if causal and k.shape[2] != Tq:
        raise ValueError(f"attention: causal attention needs as many keys as queries, got Tq={Tq}, "
                         f"Tk={k.shape[2]}")
    if Tq == 0 or k.shape[2] == 0:
        raise ValueError("attention: sequences must have at least one position")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p={dropout_p} must be in [0, 1)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name} must be contiguous in its last (head) dimension; call "
                             f".contiguous() on it")
    check_device("attention", q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, dropout_p: float = 0.0,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v with dropout on the attention weights, fused.

    The same function as F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p,
    scale=scale). q, k, v: (B, H, T, D), any strides with a contiguous last dimension (the model's
    (B, T, H, D).transpose(1, 2) views are read in place); D in HEAD_DIMS; float32, float16 or bfloat16,
    fp32 accumulation, output in the input dtype."""
    _check_inputs(q, k, v, causal, dropout_p)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _attention_fwd_op(q, k, v, bool(causal), float(dropout_p), float(scale))[0]


def dropout_mask(B: int, H: int, Tq: int, Tk: int, dropout_p: float, seed: int, device="cpu") -> torch.Tensor:
    """For tests: the (B, H, Tq, Tk) boolean keep-mask that the kernels use for this seed."""
    out = torch.empty((B * H, Tq, Tk), dtype=torch.int8, device=device)
    grid = (triton.cdiv(Tq, 32), triton.cdiv(Tk, 32), B * H)
    _dropout_mask_kernel[grid](out, seed, dropout_p, Tq, Tk, BLOCK_M=32, BLOCK_N=32)
    return out.view(B, H, Tq, Tk).bool()


def last_seed_of(q, k, v, causal=True, dropout_p=0.0, scale=None):
    """For tests: run the forward op and return (output, the dropout seed it drew)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    o, _, seed = _attention_fwd_op(q, k, v, causal, dropout_p, scale)
    return o, int(seed.item())


# ------------------------------------------------------------------------------------------------
# what `python -m kernels.inspect` compiles (the contract is described at the top of kernels/inspect.py)

# (dtype, head dim, causal, dropout): GPT-2's bf16 call (D=64) and D=128, causal or not, dropout off or on; a padded
# head dim (96 runs in BLOCK_D=128); fp16 (it compiles like bf16: two rows to show it)
INSPECT_PROBLEMS = [(torch.bfloat16, d, causal, dropout) for d in (64, 128) for causal in (True, False)
                    for dropout in (False, True)]
INSPECT_PROBLEMS += [(torch.bfloat16, 96, True, False), (torch.float16, 64, True, False),
                     (torch.float16, 128, True, True)]


def inspect_cases(problems=None):
    """Every attention kernel x every launch config it can pick on a GPU x representative problems: GPT-2 124M's
    call (B=16, H=12, T=1024, q/k/v the (B, T, H, D).transpose(1, 2) views of c_attn's output)."""
    from kernels.inspect import launch_case
    B, H, T = 16, 12, 1024
    cases = []
    for dtype, D, causal, dropout in problems or INSPECT_PROBLEMS:
        C = H * D
        qkv = (T * 3 * C, D, 3 * C)      # strides (b, h, t) of the c_attn views
        dense = (H * T * D, T * D, D)    # a contiguous (B, H, T, D) tensor: o, dq, dk, dv
        do = (T * C, D, C)               # the gradient of y.transpose(1, 2), as the model's backward hands it
        problem = {"dtype": _DTYPE_NAMES[dtype], "head_dim": D, "causal": causal, "dropout": dropout}
        block_d = _block_d(D)
        common = dict(seed=12345, sm_scale=D ** -0.5, dropout_p=0.1 if dropout else 0.0)
        flags = dict(CAUSAL=causal, DROPOUT=dropout, BLOCK_D=block_d)
        for c in configs_for(FWD_CONFIGS, block_d):
            cases.append(launch_case("attention_fwd", _attn_fwd, c, problem, dict(
                Q=dtype, K=dtype, V=dtype, O=dtype, LSE=torch.float32, **common,
                **_strides("q", qkv), **_strides("k", qkv), **_strides("v", qkv), **_strides("o", dense),
                H=H, Tq=T, Tk=T, D=D, **flags)))
        cases.append(launch_case("attention_bwd_preprocess", _attn_bwd_preprocess, PREPROCESS_CONFIG, problem, dict(
            O=dtype, DO=dtype, Delta=torch.float32, **_strides("o", dense), **_strides("do", do), H=H, Tq=T, D=D,
            BLOCK_D=block_d)))
        grads = dict(Q=dtype, K=dtype, V=dtype, DO=dtype)
        strides = {**_strides("q", qkv), **_strides("k", qkv), **_strides("v", qkv), **_strides("do", do)}
        for c in configs_for(DKDV_CONFIGS, block_d):
            cases.append(launch_case("attention_bwd_dkdv", _attn_bwd_dkdv, c, problem, dict(
                **grads, DK=dtype, DV=dtype, LSE=torch.float32, Delta=torch.float32, **common, **strides,
                **_strides("dk", dense), **_strides("dv", dense), H=H, Tq=T, Tk=T, D=D, **flags)))
        for c in configs_for(DQ_CONFIGS, block_d):
            cases.append(launch_case("attention_bwd_dq", _attn_bwd_dq, c, problem, dict(
                **grads, DQ=dtype, LSE=torch.float32, Delta=torch.float32, **common, **strides,
                **_strides("dq", dense), H=H, Tq=T, Tk=T, D=D, **flags)))
    return cases


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _strides(name, strides):
    """{stride_<name>b: .., stride_<name>h: .., stride_<name>m or n: ..}, named as the kernels name them."""
    row = {"q": "m", "o": "m", "do": "m", "dq": "m"}.get(name, "n")
    return dict(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}{row}"), strides))
