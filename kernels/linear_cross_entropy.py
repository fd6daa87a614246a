"""The language-model head's loss, fused: cross_entropy(x @ W^T, targets) without the (N, V) logits, in Triton.

    loss_i = logsumexp_v(s_iv) - s_i,t_i,      s = x W^T,   x: (N, C) rows,  W: (V, C) vocabulary

For GPT-2 the logits are the largest tensor of a training step (16 x 1024 x 50304 in fp32 is 3.3 GB, and their
gradient as much again). Here they are never held whole.

Forward (`_lce_fwd`): one program per (block of BLOCK_M rows, split of the vocabulary). It walks its BLOCK_V-wide
vocabulary tiles; each logits tile is a tensor-core product x_block @ W_tile^T accumulated in fp32 over BLOCK_K
slices of C, folded at once into an online logsumexp (running max m and sum l of exp(s - m), as in
FlashAttention's softmax). The target's logit is a dot product x_i . W[t_i] per row, computed by the program
whose split holds t_i (not picked out of every logits tile: that cost a compare, select and add per logit). A
program writes three floats per row (m, l, target logit); the splits (more programs when there are few row blocks)
are merged in PyTorch on these (N, splits) vectors. Memory: O(N) floats. On sm_90, fp16/bf16 x and W tiles are
loaded by TMA (tensor descriptors made on the device, pipelined num_stages deep; the hardware zero-fills past N, V
and C); elsewhere, and for fp32, by masked pointer loads (cp.async).

Backward, with P = softmax(s) and g_i the upstream gradient of row i's loss (times 1/count for "mean"):
    dlogits = (P - onehot(t)) * g,    dx = dlogits @ W,    dW = dlogits^T @ x
The logits are recomputed, one vocabulary chunk of Vc columns at a time: `_lce_dlogits` writes the (N, Vc)
dlogits of a chunk (recomputing each tile with tl.dot and the saved logsumexp), then two GEMMs (cuBLAS on a GPU)
give that chunk's rows of dW exactly (no accumulation across chunks: every row of x is in every chunk) and its
contribution to dx, added into an fp32 accumulator. The chunk holds at most CHUNK_WEIGHTS times as many elements
as W and at most a quarter of the vocabulary, so the extra memory is a small multiple of the weight gradient
autograd allocates anyway, and never the whole logits.

Why recompute in the backward rather than compute the gradients in the forward (Liger-Kernel does the latter):
the forward kernel never stores logits, so gradients in the forward would need the same recomputation (the
logsumexp must be complete before any softmax term exists): equal FLOPs (8NVC in all: 2 forward, 2 + 4 backward)
and an equal peak, since the head's backward runs right after its forward and the transformer's activations are
all still alive at that point either way. Recomputing in the backward keeps the forward cheap when no gradient is
taken (evaluation), supports reduction="none" with any upstream gradient, and needs no extra scaling pass over dW.
Measured on a CPU (one AdamW step of a 2-layer, 128-wide GPT, vocabulary 50304, batch 8 x 256; peak resident set
above the step's start, as `python -m bench.test_loss_head` measures it): 110 MiB recomputing in the backward,
132 MiB with the gradients computed in the forward (dx and dW held from the forward, then scaled copies), against
1606 MiB for F.linear + F.cross_entropy. Time: the same kernels and GEMMs run in either order, so the same FLOPs.

Rows whose target is ignore_index add nothing; "mean" divides by the number of counted rows, and when every row
is ignored the loss is 0 and the gradients are zero (not NaN). A target outside [0, V) that is not ignore_index
makes its row's loss NaN (no device sync is needed to notice it: the trainer stops on a NaN loss); on CPU
tensors it is an error at once.
"""
import torch
import triton
import triton.language as tl

from kernels._common import (
    DTYPE_NAMES,
    LOG2E,
    PRECISION,
    arch_has_tma,
    autocast_dtype,
    check_device,
    check_float,
    interpreting,
    launch_case,
    num_programs_hint,
    tanh,
    use_tma,
)

REDUCTIONS = ("mean", "sum", "none")
# the dlogits chunk of the backward holds at most CHUNK_WEIGHTS * V * C elements (and at least one tile column)
CHUNK_WEIGHTS = 2


@triton.jit
def _operand(base, rows, stride, C, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """What _logits_tile reads a (rows, C) operand through: a TMA tensor descriptor of (BLOCK_R, BLOCK_K) boxes
    (made once per program; the hardware zero-fills past `rows` and past C), or the base pointer itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[rows, C], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_K])
    else:
        return base


@triton.jit
def _logits_tile(x_src, w_src, row0, col0, rows, cols, row_mask, col_mask, stride_xm, stride_wv, C,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """s[rows, cols] = x[rows] @ W[cols]^T for one (BLOCK_M, BLOCK_V) tile, fp32, summed over BLOCK_K slices.
    rows/cols (and their masks) start at row0/col0; the TMA path needs only the starts."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        if USE_TMA:
            # two bulk copies per slice into shared memory, pipelined num_stages deep; W's box is (BLOCK_V,
            # BLOCK_K), K-major, which wgmma takes transposed from shared memory as it is
            x = x_src.load([row0, k0])
            w = w_src.load([col0, k0])
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < C
            x = tl.load(x_src + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            # W's tile read as (BLOCK_V, BLOCK_K) rows, as it lies, then transposed: read as (BLOCK_K, BLOCK_V)
            # instead, sm_80's K-loop needs 24 more byte permutes (PRMT) per iteration
            w = tl.load(w_src + cols[:, None] * stride_wv + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lce_fwd(X, W, Targets, ClassWeight, PartMax, PartSum, PartTarget, PartSmooth, stride_xm, stride_wv, N, V, C,
             softcap, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
             SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    # program (row block, split): rows [pid_m * BLOCK_M, +BLOCK_M), the split's share of the vocabulary tiles
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row0 = pid_m * BLOCK_M
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    target = tl.load(Targets + rows, mask=row_mask, other=-1)
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), splits)
    lo = split * tiles_per_split * BLOCK_V
    hi = tl.minimum(lo + tiles_per_split * BLOCK_V, V)
    x_src = _operand(X, N, stride_xm, C, BLOCK_M, BLOCK_K, USE_TMA)
    w_src = _operand(W, V, stride_wv, C, BLOCK_V, BLOCK_K, USE_TMA)

    # the target's logit x_i . W[t_i], for the rows whose target is in this split's columns: one masked row gather
    # per program instead of a compare, select and add per logit and a row reduction per logits tile (capped, if
    # SOFTCAP, by the caller: one tanh per row)
    has_target = row_mask & (target >= lo) & (target < hi)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in tl.range(0, C, BLOCK_K, num_stages=1):  # not worth pipelining: one row of W per row of x
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = has_target[:, None] & (ks < C)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
        w = tl.load(W + target[:, None] * stride_wv + ks[None, :], mask=mask, other=0.0)
        target_logit += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of s * log2(e)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(s * log2(e) - m_i)
    smooth = tl.zeros((BLOCK_M,), dtype=tl.float32)  # SMOOTH: running sum of class_weight[v] * s_v
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        s = _logits_tile(x_src, w_src, row0, v0, rows, cols, row_mask, col_mask, stride_xm, stride_wv, C,
                         BLOCK_M, BLOCK_V, BLOCK_K, USE_TMA)
        if SOFTCAP:  # Gemma's final-logit softcap: softcap * tanh(s / softcap), before everything else
            s = softcap * tanh(s / softcap)
        s2 = tl.where(col_mask[None, :], s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s2 - m_new[:, None]), axis=1)
        m_i = m_new
        if SMOOTH:  # label smoothing's term needs the (weighted) sum of the row's logits
            if HAS_WEIGHT:
                class_w = tl.load(ClassWeight + cols, mask=col_mask, other=0.0)
                smooth += tl.sum(tl.where(col_mask[None, :], s * class_w[None, :], 0.0), axis=1)
            else:
                smooth += tl.sum(tl.where(col_mask[None, :], s, 0.0), axis=1)
    out = rows * splits + split
    tl.store(PartMax + out, m_i / LOG2E, mask=row_mask)  # back to natural-log units
    tl.store(PartSum + out, l_i, mask=row_mask)
    tl.store(PartTarget + out, target_logit, mask=row_mask)
    if SMOOTH:
        tl.store(PartSmooth + out, smooth, mask=row_mask)


@triton.jit
def _lce_dlogits(X, W, Targets, ClassWeight, LSE, RowP, RowT, RowU, DL, stride_xm, stride_wv, stride_dl, N, V, C,
                 v_start, v_end, softcap, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_TMA: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    # one (BLOCK_M, BLOCK_V) tile of the chunk's dlogits, with c the (capped) logits and p = softmax(c):
    #     dl = p * row_p - onehot(target) * row_t - class_weight * row_u     (times dc/ds = 1 - tanh^2 if SOFTCAP)
    # row_p, row_t, row_u: per-row coefficients from the upstream gradient (`_row_coefficients`; 0 for ignored
    # rows); without smoothing or weights row_p = row_t = the row's gradient, and dl = (p - onehot) * g
    row0 = tl.program_id(0) * BLOCK_M
    col0 = v_start + tl.program_id(1) * BLOCK_V
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = col0 + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < v_end
    x_src = _operand(X, N, stride_xm, C, BLOCK_M, BLOCK_K, USE_TMA)
    w_src = _operand(W, V, stride_wv, C, BLOCK_V, BLOCK_K, USE_TMA)
    s = _logits_tile(x_src, w_src, row0, col0, rows, cols, row_mask, col_mask, stride_xm, stride_wv, C,
                     BLOCK_M, BLOCK_V, BLOCK_K, USE_TMA)
    if SOFTCAP:
        capped = tanh(s / softcap)
        s = softcap * capped
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    row_p = tl.load(RowP + rows, mask=row_mask, other=0.0)
    row_t = tl.load(RowT + rows, mask=row_mask, other=0.0)
    target = tl.load(Targets + rows, mask=row_mask, other=-1)
    # per logit: one FFMA into the exponential, and the one-hot as a 32-bit compare of the column within the tile
    # against the target's (-1 when elsewhere; computed per row in 64 bits)
    target_col = tl.where((target >= col0) & (target < col0 + BLOCK_V), target - col0, -1).to(tl.int32)
    p = tl.math.exp2(s * LOG2E - (lse * LOG2E)[:, None])
    dl = p * row_p[:, None] - tl.where(tl.arange(0, BLOCK_V)[None, :] == target_col[:, None], row_t[:, None], 0.0)
    if SMOOTH:
        row_u = tl.load(RowU + rows, mask=row_mask, other=0.0)
        if HAS_WEIGHT:
            class_w = tl.load(ClassWeight + cols, mask=col_mask, other=0.0)
            dl -= row_u[:, None] * class_w[None, :]
        else:
            dl -= row_u[:, None]
    if SOFTCAP:
        dl = dl * (1.0 - capped * capped)
    tl.store(DL + rows[:, None] * stride_dl + (cols - v_start)[None, :], dl.to(DL.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# ------------------------------------------------------------------------------------------------
# launch configuration. On a GPU: autotuned over these lists, per kind of input. fp16/bf16 tiles feed the tensor
# cores (wgmma on Hopper), with fp32 accumulators of BLOCK_M x BLOCK_V; fp32 inputs multiply in full precision on
# the FMA units with the operands in registers, so their tiles and K slices are smaller (larger ones spill: see
# `python -m kernels.inspect`). Under the interpreter: one wide tile (each program and loop iteration costs
# Python time, a wide numpy tile costs little); the tests run every GPU entry there too.


def _configs(entries):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bv, bk, w, s in entries]


CONFIGS = {  # (kernel, fp32 inputs?) -> the launch configs
    ("fwd", False): _configs([(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 256, 64, 8, 3)]),
    ("dlogits", False): _configs([(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)]),
    ("fwd", True): _configs([(64, 64, 32, 8, 2), (128, 64, 16, 8, 1)]),
    ("dlogits", True): _configs([(64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2)]),
}
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_V": 1024, "BLOCK_K": 128}, num_warps=4, num_stages=1)
_KERNELS = {"fwd": _lce_fwd, "dlogits": _lce_dlogits}
_FEATURES = ["SOFTCAP", "SMOOTH", "HAS_WEIGHT"]
_AUTOTUNE_KEYS = {"fwd": ["V", "C", "USE_TMA", *_FEATURES], "dlogits": ["C", "USE_TMA", *_FEATURES]}  # dtype: in
# Triton's own key
_TUNED = {(name, fp32): triton.autotune(configs, key=_AUTOTUNE_KEYS[name])(_KERNELS[name])
          for (name, fp32), configs in CONFIGS.items()}


def _launch(name, dtype, config, grid, flags, *args):
    """Run kernel `name` with `config` when given; else autotuned over CONFIGS on a GPU, INTERPRETER_CONFIG on the
    interpreter (where timing means nothing). `grid` takes the launch's meta-parameters; `flags` are the
    constexpr choices (USE_TMA: the tensor-descriptor loads, sm_90 with aligned operands; the loss's features)."""
    if config is None and not interpreting():
        _TUNED[name, dtype == torch.float32][grid](*args, **flags)
        return
    config = config or INTERPRETER_CONFIG
    _KERNELS[name][grid(config.kwargs)](*args, **config.kwargs, **flags, num_warps=config.num_warps,
                                        num_stages=config.num_stages)


def _tma_path(x, weight):
    """Whether the kernels load x and W through TMA descriptors: fp16/bf16 (tensor-core) inputs on sm_90+ with
    16-byte aligned rows (`use_tma`, shared with attention). fp32 multiplies on the FMA units with its operands in
    registers, where the descriptor path gains nothing and spills (255 registers on sm_90)."""
    return x.dtype != torch.float32 and use_tma(x, weight)


def _flags(x, weight, label_smoothing, softcap, class_weight):
    return dict(USE_TMA=_tma_path(x, weight), SOFTCAP=softcap is not None, SMOOTH=label_smoothing > 0,
                HAS_WEIGHT=class_weight is not None)


def _num_splits(N, V, device):
    """Vocabulary splits per row block: enough programs to fill the device when there are few row blocks (the
    split results are merged on (N, splits) vectors). Fixed before the launch (it sizes the buffers), so it
    assumes 128-row blocks."""
    row_blocks = triton.cdiv(N, 128)
    return max(1, min(16, triton.cdiv(num_programs_hint(device, per_sm=2), row_blocks), triton.cdiv(V, 1024)))


def _target_weights(targets, ignore_index, class_weight):
    """(counted, w_t): which rows count, and each row's weight (its target's class weight; 1 without weights; 0
    for ignored rows)."""
    counted = targets != ignore_index
    if class_weight is None:
        return counted, counted.float()
    V = class_weight.shape[0]
    return counted, torch.where(counted, class_weight[targets.clamp(0, V - 1)], 0.0)


def _weight_sum(V, class_weight):
    """sum_v w_v, the weight label smoothing spreads over the vocabulary (V without class weights)."""
    return float(V) if class_weight is None else class_weight.sum()


def _denominators(counted, w_t, class_weight):
    """What "mean" divides by: the counted rows' weights for the cross-entropy (as F.cross_entropy), their number
    for the z-loss; 1 where that is 0 (every row ignored: the loss is 0, not 0/0)."""
    count = counted.sum().float()
    weights = count if class_weight is None else w_t.sum()
    return torch.where(weights > 0, weights, 1.0), count.clamp_min(1)


def _forward(x, weight, targets, ignore_index, reduction, *, class_weight=None, label_smoothing=0.0, z_loss=0.0,
             softcap=None, config=None, splits=None):
    """(loss, z term, lse): the loss as `reduction` asks (fp32, the z-loss term included), the z-loss term alone
    (reduced the same way, for logging) and each row's logsumexp of the capped logits (fp32, saved for backward).

    Per counted row i, with c the capped logits, t its target, w the class weights (1 without) and e the label
    smoothing:  loss_i = (1 - e) w_t (lse_i - c_t) + e/V sum_v w_v (lse_i - c_v) + z_loss lse_i^2."""
    N, C = x.shape
    V = weight.shape[0]
    splits = splits or _num_splits(N, V, x.device)
    part_max = torch.empty((N, splits), dtype=torch.float32, device=x.device)
    part_sum = torch.empty_like(part_max)
    part_target = torch.empty_like(part_max)
    part_smooth = torch.empty_like(part_max) if label_smoothing > 0 else part_max  # unread without smoothing
    flags = _flags(x, weight, label_smoothing, softcap, class_weight)
    if N > 0:
        _launch("fwd", x.dtype, config, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), splits), flags,
                x, weight, targets, part_max if class_weight is None else class_weight, part_max, part_sum,
                part_target, part_smooth, x.stride(0), weight.stride(0), N, V, C, float(softcap or 1.0))
    row_max = part_max.max(dim=1).values
    lse = row_max + torch.log((part_sum * torch.exp(part_max - row_max[:, None])).sum(dim=1))
    target_logit = part_target.sum(dim=1)
    if softcap is not None:
        target_logit = softcap * torch.tanh(target_logit / softcap)
    counted, w_t = _target_weights(targets, ignore_index, class_weight)
    row_loss = (1.0 - label_smoothing) * w_t * (lse - target_logit)
    if label_smoothing > 0:
        row_loss = row_loss + label_smoothing / V * (_weight_sum(V, class_weight) * lse - part_smooth.sum(dim=1))
    row_loss = torch.where(counted, row_loss, 0.0)
    in_range = (targets >= 0) & (targets < V)
    row_loss = torch.where(counted & ~in_range, float("nan"), row_loss)  # a bad target: NaN, noticed by the caller
    row_z = torch.where(counted, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return row_loss + row_z, row_z, lse
    ce, z = row_loss.sum(), row_z.sum()
    if reduction == "mean":
        ce_den, z_den = _denominators(counted, w_t, class_weight)
        ce, z = ce / ce_den, z / z_den
    return ce + z, z, lse


def _row_coefficients(grad, targets, class_weight, lse, ignore_index, reduction, label_smoothing, z_loss, V):
    """The per-row coefficients of _lce_dlogits (fp32, (N,) each; 0 for ignored rows): dloss/dc_v =
    p_v row_p - [v = t] row_t - w_v row_u, from differentiating _forward's loss_i (sum_v p_v = 1)."""
    N = targets.shape[0]
    counted, w_t = _target_weights(targets, ignore_index, class_weight)
    grad = grad.float().expand(N)
    g_ce, g_z = grad, grad
    if reduction == "mean":
        ce_den, z_den = _denominators(counted, w_t, class_weight)
        g_ce, g_z = grad / ce_den, grad / z_den
    g_ce = torch.where(counted, g_ce, 0.0)
    row_t = g_ce * (1.0 - label_smoothing) * w_t
    row_p = row_t
    row_u = g_ce * (label_smoothing / V)
    if label_smoothing > 0:
        row_p = row_p + row_u * _weight_sum(V, class_weight)
    if z_loss:
        row_p = row_p + torch.where(counted, g_z * (2.0 * z_loss) * lse, 0.0)
    return row_p.contiguous(), row_t.contiguous(), row_u.contiguous()


def _vocab_chunk(N, V, C):
    """Columns of dlogits materialized at once: at most CHUNK_WEIGHTS * V * C elements and a quarter of the
    vocabulary (so never the whole logits, however few the rows), a multiple of 256 columns."""
    width = min((CHUNK_WEIGHTS * V * C) // max(N, 1), triton.cdiv(V, 4))
    return min(V, max(256, width // 256 * 256))


def _backward(grad, x, weight, targets, lse, ignore_index, reduction, *, class_weight=None, label_smoothing=0.0,
              z_loss=0.0, softcap=None, config=None, chunk=None):
    """(dx, dweight) for the upstream gradient `grad` of the loss (a scalar, or (N,) for reduction="none")."""
    N, C = x.shape
    V = weight.shape[0]
    row_p, row_t, row_u = _row_coefficients(grad, targets, class_weight, lse, ignore_index, reduction,
                                            label_smoothing, z_loss, V)
    dweight = torch.empty_like(weight)
    if N == 0:
        return torch.zeros_like(x), dweight.zero_()
    chunk = chunk or _vocab_chunk(N, V, C)
    dl_buffer = torch.empty((N, chunk), dtype=x.dtype, device=x.device)
    # dx sums over the chunks: in fp32 when there are several, directly in x's dtype when there is one
    dx = torch.empty_like(x) if chunk >= V else torch.zeros((N, C), dtype=torch.float32, device=x.device)
    flags = _flags(x, weight, label_smoothing, softcap, class_weight)
    for v_start in range(0, V, chunk):
        v_end = min(v_start + chunk, V)
        dl = dl_buffer[:, :v_end - v_start]
        _launch("dlogits", x.dtype, config,
                lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(v_end - v_start, meta["BLOCK_V"])),
                flags,
                x, weight, targets, row_p if class_weight is None else class_weight, lse, row_p, row_t, row_u,
                dl, x.stride(0), weight.stride(0), dl.stride(0), N, V, C, v_start, v_end, float(softcap or 1.0))
        torch.mm(dl.t(), x, out=dweight[v_start:v_end])  # every row of x is in this chunk: dW's rows are final
        if chunk >= V:
            torch.mm(dl, weight[v_start:v_end], out=dx)
        elif dx.dtype == x.dtype:
            dx.addmm_(dl, weight[v_start:v_end])
        else:
            dx += torch.mm(dl, weight[v_start:v_end])
    return dx.to(x.dtype), dweight


# ------------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile (traced through their fake implementations), differentiable through
# register_autograd. Their bodies run with autocast off: the public function has already chosen the dtypes.


@torch.library.custom_op("nanogpt_kernels::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 class_weight: torch.Tensor | None, ignore_index: int, reduction: str,
                                 label_smoothing: float, z_loss: float,
                                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _forward(x, weight, targets, ignore_index, reduction, class_weight=class_weight,
                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


@_linear_cross_entropy_fwd_op.register_fake
def _(x, weight, targets, class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    N = x.shape[0]
    loss = x.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return loss, torch.empty_like(loss), x.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("nanogpt_kernels::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 class_weight: torch.Tensor | None, lse: torch.Tensor, ignore_index: int,
                                 reduction: str, label_smoothing: float, z_loss: float,
                                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _backward(grad, x, weight, targets, lse, ignore_index, reduction, class_weight=class_weight,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


@_linear_cross_entropy_bwd_op.register_fake
def _(grad, x, weight, targets, class_weight, lse, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, targets, class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap = inputs
    lse = output[2]
    ctx.save_for_backward(x, weight, targets, class_weight, lse)
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap)


def _backward_autograd(ctx, grad, _dz, _dlse):
    # the z term returned alone is detached (a figure to log): its gradient is in the loss's
    x, weight, targets, class_weight, lse = ctx.saved_tensors
    ignore_index, reduction, label_smoothing, z_loss, softcap = ctx.options
    dx, dweight = _linear_cross_entropy_bwd_op(grad, x, weight, targets, class_weight, lse, ignore_index,
                                               reduction, label_smoothing, z_loss, softcap)
    return dx, dweight, None, None, None, None, None, None, None


_linear_cross_entropy_fwd_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def _check_options(name, V, device, label_smoothing, z_loss, softcap, class_weight):
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing={label_smoothing}; it must be in [0, 1] (0 turns it off)")
    if not (z_loss >= 0.0 and z_loss != float("inf")):
        raise ValueError(f"{name}: z_loss={z_loss}; it must be a finite number >= 0 (PaLM used 1e-4; 0 turns it "
                         f"off)")
    if softcap is not None and not (softcap > 0.0 and softcap != float("inf")):
        raise ValueError(f"{name}: softcap={softcap}; it must be a finite number > 0 (Gemma 2 uses 30.0), or None")
    if class_weight is None:
        return None
    if not isinstance(class_weight, torch.Tensor) or class_weight.shape != (V,):
        shape = tuple(class_weight.shape) if isinstance(class_weight, torch.Tensor) else type(class_weight).__name__
        raise ValueError(f"{name}: class_weight is {shape}; expected a tensor of shape ({V},), one weight per class")
    check_float(name, "class_weight", class_weight)
    if class_weight.device != device:
        raise ValueError(f"{name}: class_weight is on {class_weight.device} but x is on {device}: move it there")
    return class_weight.detach().float().contiguous()  # a constant, as in F.cross_entropy: no gradient


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         reduction: str = "mean", *, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, class_weight: torch.Tensor | None = None,
                         return_z_loss: bool = False):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index, reduction=reduction), without the logits.

    x: (..., C) float32/float16/bfloat16; weight: (V, C) of x's dtype; targets: int64 of x's leading shape.
    Under autocast, x and weight are cast to the autocast dtype (as F.linear would). fp32 accumulation; the loss
    is float32 (a scalar, or of targets' shape for reduction="none"). Rows whose target is ignore_index count
    for nothing; "mean" divides by the counted rows and is 0 (with zero gradients) when there are none.

    Options, all inside the tiled online logsumexp (still no logits):
      label_smoothing, class_weight: as F.cross_entropy's label_smoothing and weight (`weight` here is the
        head's matrix, hence the name); "mean" divides by the counted rows' target weights, as it does.
      z_loss: PaLM's auxiliary loss z_loss * logsumexp^2 per counted row, added to the loss ("mean": averaged
        over the counted rows, whatever the class weights); return_z_loss=True returns (loss, z term), the
        second detached, for logging.
      softcap: Gemma 2's final-logit capping, logits -> softcap * tanh(logits / softcap), before all the above.
    """
    name = "linear_cross_entropy"
    for what, t in (("x", x), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match: expected "
                         f"x (..., C) and weight (V, C)")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"{name}: targets has shape {tuple(targets.shape)}, expected {tuple(x.shape[:-1])} "
                         f"(x's shape without its last dimension)")
    if targets.dtype != torch.int64:
        raise TypeError(f"{name}: targets has dtype {targets.dtype}; expected torch.int64 (call .long() on it)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if weight.shape[0] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: the vocabulary (V) and the width (C) must be at least 1")
    check_float(name, "x", x)
    check_float(name, "weight", weight)
    check_device(name, x, weight, targets)
    class_weight = _check_options(name, weight.shape[0], x.device, label_smoothing, z_loss, softcap, class_weight)
    dtype = autocast_dtype(x.device)
    if dtype is not None:  # what F.linear does under autocast, done explicitly
        x, weight = x.to(dtype), weight.to(dtype)
    if x.dtype != weight.dtype:
        raise TypeError(f"{name}: x is {x.dtype} but weight is {weight.dtype}: cast one of them (or use autocast)")
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"{name}: target {targets[bad][0].item()} is outside [0, {weight.shape[0]}) and is "
                             f"not ignore_index={ignore_index}")
    shape = targets.shape
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    loss, z, _ = _linear_cross_entropy_fwd_op(x, weight, targets.reshape(-1).contiguous(), class_weight,
                                              int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                                              None if softcap is None else float(softcap))
    if reduction == "none":
        loss, z = loss.view(shape), z.view(shape)
    return (loss, z.detach()) if return_z_loss else loss


def inspect_cases(arch="sm_90"):
    """What `python -m kernels.inspect` compiles (the contract is at the top of kernels/inspect.py): every shipped
    config of both kernels, at GPT-2 124M's head (16K rows of width 768, vocabulary 50304), with the load path the
    launch picks on `arch` (fp16/bf16: TMA descriptors on sm_90, pointers on sm_80; fp32: pointers), the plain
    loss; and the first bf16 config of each kernel with every option on (softcap, label smoothing, class
    weights: the most code one launch can carry). "loops" describes the one loop with a tl.dot, the K-loop: one
    BLOCK_K slice of the (BLOCK_M, BLOCK_V) logits tile per iteration (kernels/inspect.py's cost model reads it)."""
    N, C, V = 16 * 1024, 768, 50304
    tma_arch = arch_has_tma(arch)
    chunk = _vocab_chunk(N, V, C)
    f32 = torch.float32
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        fp32 = dtype == torch.float32
        for name, kernel in (("fwd", _lce_fwd), ("dlogits", _lce_dlogits)):
            for i, config in enumerate(CONFIGS[name, fp32]):
                for options in [False] + ([True] if i == 0 and not fp32 else []):
                    problem = {"dtype": DTYPE_NAMES[dtype], "width": C, "vocab": V, "rows": N}
                    if options:
                        problem["options"] = "softcap+smoothing+weights"
                    launch = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                    if name == "fwd":
                        args = dict(PartMax=f32, PartSum=f32, PartTarget=f32, PartSmooth=f32, stride_xm=C,
                                    stride_wv=C, N=N, V=V, C=C)
                    else:
                        args = dict(LSE=f32, RowP=f32, RowT=f32, RowU=f32, DL=dtype, stride_xm=C, stride_wv=C,
                                    stride_dl=chunk, N=N, V=V, C=C, v_start=chunk, v_end=2 * chunk)
                    flags = dict(USE_TMA=tma_arch and not fp32, SOFTCAP=options, SMOOTH=options, HAS_WEIGHT=options)
                    case = launch_case(f"linear_cross_entropy_{name}", kernel, launch, problem,
                                       dict(X=dtype, W=dtype, Targets=torch.int64, ClassWeight=f32, **args,
                                            softcap=30.0, **flags))
                    case["loops"] = _k_loop(config)
                    cases.append(case)
    return cases


def _k_loop(config):
    """The static cost model's description of the kernels' one dot loop (the K loop of _logits_tile): one
    BLOCK_M x BLOCK_V x BLOCK_K slice of the logits tile per iteration. (fp32 inputs multiply on the FMA units:
    their SASS has no MMA loop, and the model says so.)"""
    m, v, k = (config.kwargs[x] for x in ("BLOCK_M", "BLOCK_V", "BLOCK_K"))
    return [{"name": "k", "masked": False, "mma_flops": 2 * m * v * k, "tile": [m, v]}]
