"""kernels.attention against a float64 reference.

Error norm: relative Frobenius (L2) norm, ||actual - expected|| / ||expected||; for gradients the denominator
is max(||expected||, ||dO||), since a gradient can be exactly zero (T=1: dq = dk = 0)."""
import importlib
import math

import pytest
import torch

from helpers import DEVICE, attention_reference
from kernels import attention
from kernels._common import SOFTCAP_EXACT, SOFTCAP_FAST
from kernels.attention import dropout_mask, last_seed_of
from kernels.testing import relative_error, tolerance

attention_module = importlib.import_module("kernels.attention")  # `kernels.attention` is also the function

SHAPES = [(1, 1, 1, 16), (2, 3, 7, 32), (1, 2, 100, 48), (2, 2, 128, 64), (1, 1, 257, 80), (1, 2, 64, 128),
          (1, 1, 33, 96)]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


reference = attention_reference


def make_qkv(shape, dtype, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_() for _ in range(3)]


def check(q, k, v, causal, dtype, **kwargs):
    o = attention(q, k, v, causal=causal, **{k_: v_ for k_, v_ in kwargs.items() if k_ != "keep"})
    assert o.dtype == dtype and o.shape == q.shape
    o_ref = reference(q, k, v, causal, kwargs.get("scale"), kwargs.get("keep"), kwargs.get("dropout_p", 0.0),
                      kwargs.get("softcap"), kwargs.get("window"))
    tol = tolerance(dtype, "matmul")
    assert relative_error(o, o_ref) <= tol, "output"
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do.double())
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype
        assert relative_error(g, g_ref, scale=do) <= tol, f"d{name}"
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients(shape, causal, dtype):
    check(*make_qkv(shape, dtype), causal, dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_custom_scale_and_unequal_lengths(causal):
    q, k, v = make_qkv((1, 2, 40, 64), torch.float32)
    check(q, k, v, causal, torch.float32, scale=0.3)
    if not causal:  # cross-attention shapes: 40 queries, 70 keys
        _, k2, v2 = make_qkv((1, 2, 70, 64), torch.float32, seed=1)
        check(q, k2, v2, False, torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shapes", [((1, 2, 40, 64), (1, 2, 70, 64)), ((1, 2, 70, 32), (1, 2, 23, 32))],
                         ids=["more-keys", "more-queries"])
def test_one_launch_backward_with_unequal_lengths_and_dropout(shapes, causal):
    """The backward's program n does dK/dV of key block n and dQ of query block n: with Tq != Tk some programs
    have only one of the two (cross-attention, no causal mask); with dropout, against the kernels' own mask."""
    if causal:
        shapes = (shapes[0], shapes[0])
    (q, _, _), (_, k, v) = make_qkv(shapes[0], torch.float32), make_qkv(shapes[1], torch.float32, seed=1)
    check(q, k, v, causal, torch.float32)
    p = 0.2
    torch.manual_seed(5)
    _, seed = last_seed_of(q, k, v, causal, p)
    keep = dropout_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], p, seed, device=DEVICE)
    torch.manual_seed(5)
    check(q, k, v, causal, torch.float32, dropout_p=p, keep=keep)


def test_backward_is_deterministic():
    """No atomics: two backward passes give bit-identical gradients."""
    q, k, v = make_qkv((2, 2, 77, 32), torch.float32)
    o = attention(q, k, v)
    do = torch.randn_like(o)
    first = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(o, (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ GQA, causal Tq < Tk,
# head dims up to 256, softcap, sliding windows: flash-attention's test grid, shrunk for the interpreter


def make_gqa(B, H, H_kv, Tq, Tk, D, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    shapes = ((B, H, Tq, D), (B, H_kv, Tk, D), (B, H_kv, Tk, D))
    return [torch.randn(s, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("H_kv", [8, 4, 2, 1], ids=lambda h: {8: "MHA", 1: "MQA"}.get(h, f"GQA{8 // h}"))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_grouped_query_attention(H_kv, causal, dtype):
    """k/v with H_kv heads shared by H / H_kv query heads each, never repeated in memory: dK/dV sum over the
    group inside one program."""
    check(*make_gqa(2, 8, H_kv, 37, 37, 32, dtype), causal, dtype)


# (Tq, Tk): flash-attention's ragged pairs (113 vs 203, 108 vs 256) and short ones; causal aligned bottom-right
UNEQUAL_LENGTHS = [(113, 203), (108, 256), (1, 7), (7, 7), (3, 40), (17, 33)]


@pytest.mark.parametrize("lengths", UNEQUAL_LENGTHS, ids=str)
def test_causal_with_fewer_queries_than_keys(lengths):
    Tq, Tk = lengths
    check(*make_gqa(1, 2, 1, Tq, Tk, 16), True, torch.float32)


@pytest.mark.parametrize("D", [40, 80, 96, 160, 192, 224, 256])
def test_head_dims_up_to_256(D):
    check(*make_gqa(1, 2, 1, 19, 19, D), True, torch.float32)


@pytest.mark.parametrize("D", [160, 256])
def test_large_head_dims_in_half_precision(D):
    check(*make_gqa(1, 2, 2, 33, 33, D, torch.float16), True, torch.float16)


@pytest.mark.parametrize("softcap", [1.0, 5.0, 30.0])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_softcap(softcap, causal):
    q, k, v = make_gqa(1, 2, 2, 45, 45, 32)
    with torch.no_grad():
        q *= 3.0  # scores large enough that the cap bends them
    check(q, k, v, causal, torch.float32, softcap=softcap)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
def test_softcap_in_half_precision(dtype, softcap):
    """fp16/bf16 on a GPU take the hardware's tanh (tanh.approx.f32, ~2^-11 relative error: SOFTCAP_FAST); the
    interpreter the fp32 one. Either must stay within the dtype's tolerance against float64."""
    q, k, v = make_gqa(1, 4, 2, 45, 45, 64, dtype)
    with torch.no_grad():
        q *= 3.0
    check(q, k, v, True, dtype, softcap=softcap, window=(20, None))


def test_softcap_mode_picks_the_hardware_tanh_for_half_precision_on_a_gpu():
    mode = attention_module.softcap_mode
    fast, exact = SOFTCAP_FAST.value, SOFTCAP_EXACT
    assert mode(0.0, torch.bfloat16, interpreter=False) == 0 and mode(None, torch.float32) == 0
    assert mode(30.0, torch.bfloat16, interpreter=False) == mode(30.0, torch.float16, interpreter=False) == fast
    assert mode(30.0, torch.float32, interpreter=False) == exact  # fp32 inputs keep fp32 accuracy
    assert mode(30.0, torch.float16, interpreter=True) == exact  # the interpreter cannot run inline PTX


# (window, causal): left 0 / 1 / T (the diagonal only, one neighbour, everything), right sides, both
WINDOWS = [((0, None), True), ((1, None), True), ((50, None), True), ((7, 0), True), ((5, 3), False),
           ((0, 0), False), ((None, 4), False), ((16, None), False), ((2, 50), False)]


@pytest.mark.parametrize("window, causal", WINDOWS, ids=str)
@pytest.mark.parametrize("lengths", [(50, 50), (23, 61)], ids=str)
def test_sliding_window(window, causal, lengths):
    check(*make_gqa(1, 2, 1, *lengths, 32), causal, torch.float32, window=window)


@pytest.mark.parametrize("lengths, window", [((70, 20), (0, 0)), ((40, 9), (3, 1))], ids=str)
def test_queries_that_see_no_key_output_zero(lengths, window):
    """With more queries than keys, a bottom-right window leaves the first queries beyond every key: those rows
    are 0 and their gradients 0, as in FlashAttention."""
    q, k, v = make_gqa(1, 2, 2, *lengths, 16)
    o = attention(q, k, v, causal=False, window=window).detach()
    unseen = attention_reference(q, k, v, False, window=window).abs().sum(-1) == 0
    assert unseen.any() and torch.equal(o[unseen], torch.zeros_like(o[unseen]))
    check(q, k, v, False, torch.float32, window=window)


@pytest.mark.parametrize("D", [48, 200], ids=["fused-dkdv", "split-dkdv"])
def test_all_options_together_with_dropout(D):
    """GQA, causal Tq < Tk, softcap, a window and dropout at once, against the kernels' own mask; at D=200
    (BLOCK_D=256) the backward walks dV, then dK (SPLIT_DKDV_FROM)."""
    assert (attention_module.block_d_of(D) >= attention_module.SPLIT_DKDV_FROM) == (D == 200)
    q, k, v = make_gqa(1, 4, 2, 30, 47, D)
    options = dict(softcap=4.0, window=(9, None))
    p = 0.2
    torch.manual_seed(5)
    o = attention(q, k, v, True, p, **options)
    torch.manual_seed(5)
    _, seed = last_seed_of(q, k, v, True, p)
    keep = dropout_mask(1, 4, 30, 47, p, seed, device=DEVICE)
    torch.manual_seed(5)
    grads = check(q, k, v, True, torch.float32, dropout_p=p, keep=keep, **options)
    assert o.shape == q.shape and grads[1].shape == k.shape


def test_gqa_backward_is_deterministic():
    q, k, v = make_gqa(1, 6, 2, 77, 77, 32)
    o = attention(q, k, v, window=(20, None))
    do = torch.randn_like(o)
    first = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(o, (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_window_tiles_counts_what_the_window_skips():
    tiles = attention_module.window_tiles
    full = tiles(1024, 1024, causal=True, block_m=128, block_n=64)
    assert full["visited"] < full["total"] == 8 * 16  # causal alone skips the tiles above the diagonal
    windowed = tiles(1024, 1024, causal=True, window=(128, None), block_m=128, block_n=64)
    # each query block of 128 sees at most 128 + 127 keys behind it: at most 5 key tiles of 64 (4 + a partial)
    assert windowed["visited"] <= 8 * 5 and windowed["skipped"] == windowed["total"] - windowed["visited"]
    assert tiles(100, 100, causal=False, block_m=32, block_n=16)["skipped"] == 0


@pytest.fixture
def tma_path(monkeypatch):
    """Launch the tensor-descriptor (TMA) code path that sm_90 takes; the interpreter runs descriptors too."""
    calls = []

    def use_tma(*tensors):
        calls.append(len(tensors))
        return True

    monkeypatch.setattr(attention_module, "use_tma", use_tma)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 32), (1, 2, 100, 48), (1, 1, 70, 128)], ids=str)
def test_tensor_descriptor_path(tma_path, shape, causal, dtype):
    check(*make_qkv(shape, dtype), causal, dtype)
    assert tma_path == [4, 7]  # the forward (q, k, v, o) and the backward (q, k, v, dO, dq, dk, dv) took it


@pytest.mark.parametrize("window", [None, (10, None)], ids=["plain", "window"])
def test_tensor_descriptor_path_with_gqa_and_options(tma_path, window):
    check(*make_gqa(1, 4, 2, 29, 53, 64), True, torch.float32, softcap=3.0, window=window)
    check(*make_gqa(1, 2, 1, 21, 21, 256), True, torch.float32, window=window)  # the split dK/dV walk


def test_tensor_descriptor_path_reads_strided_views_and_drops_out(tma_path):
    torch.manual_seed(0)
    B, T, H, D = 2, 45, 3, 32
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2).detach().requires_grad_() for t in qkv.split(H * D, dim=2))
    check(q, k, v, True, torch.float32)
    torch.manual_seed(9)
    _, seed = last_seed_of(q, k, v, True, 0.3)
    keep = dropout_mask(B, H, T, T, 0.3, seed, device=DEVICE)
    torch.manual_seed(9)
    check(q, k, v, True, torch.float32, dropout_p=0.3, keep=keep)


def large_score_qkv(Tq, Tk, dtype, score, D=16):
    """q, k, v whose every score q.k * D^-0.5 is `score` (q and k share one large first coordinate), plus small
    noise in the other coordinates and in v so that the gradients are not trivially zero."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, Tq, D, dtype=torch.float64) * 0.05
    k = torch.randn(1, 2, Tk, D, dtype=torch.float64) * 0.05
    v = torch.randn(1, 2, Tk, D, dtype=torch.float64)
    x = math.sqrt(abs(score) * math.sqrt(D))
    q[..., 0], k[..., 0] = x, math.copysign(x, score)
    return [t.to(dtype).to(DEVICE).requires_grad_() for t in (q, k, v)]


# (Tq, Tk): none a multiple of any key block (the interpreter walks 16 keys, the GPU configs 16..128)
LARGE_SCORE_LENGTHS = [(1, 1), (2, 2), (3, 3), (17, 17), (3, 17), (17, 3)]


def check_large_scores(Tq, Tk, dtype, score, causal=False, **kwargs):
    q, k, v = large_score_qkv(Tq, Tk, dtype, score)
    grads = check(q, k, v, causal, dtype, **kwargs)
    for name, g in zip("qkv", grads):
        assert torch.isfinite(g).all(), f"d{name} is not finite"


@pytest.mark.parametrize("score", ["negative", "positive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lengths", LARGE_SCORE_LENGTHS, ids=str)
def test_backward_with_large_scores_and_ragged_lengths(lengths, dtype, score):
    """Every score -16 (fp16) or -100 (fp32), or as large positive: a key row past Tk loads as zeros, so its
    score is 0 and its unmasked weight 2^(-lse) overflows when the real scores are strongly negative; dQ must
    mask it (it used to return NaN: inf * 0 in dS K)."""
    magnitude = 100.0 if dtype == torch.float32 else 16.0
    check_large_scores(*lengths, dtype, magnitude if score == "positive" else -magnitude)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lengths", [(3, 3), (17, 17), (3, 17)], ids=str)
def test_backward_with_large_negative_scores_on_the_descriptor_path(tma_path, lengths, dtype):
    check_large_scores(*lengths, dtype, -100.0 if dtype == torch.float32 else -16.0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("path", ["pointer", "descriptor"])
def test_backward_with_large_negative_scores_and_dropout(path, causal, monkeypatch):
    if path == "descriptor":
        monkeypatch.setattr(attention_module, "use_tma", lambda *tensors: True)
    Tq = Tk = 17
    p = 0.2
    q, k, v = large_score_qkv(Tq, Tk, torch.float16, -16.0)
    torch.manual_seed(3)
    _, seed = last_seed_of(q, k, v, causal, p)
    keep = dropout_mask(1, 2, Tq, Tk, p, seed, device=DEVICE)
    torch.manual_seed(3)
    grads = check(q, k, v, causal, torch.float16, dropout_p=p, keep=keep)
    assert all(torch.isfinite(g).all() for g in grads)


def test_strided_views_read_in_place():
    """The model's (B, T, H, D).transpose(1, 2) views give the same results as contiguous copies."""
    torch.manual_seed(0)
    B, T, H, D = 2, 45, 3, 32
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    o1, o2 = attention(*leaves), attention(*copies)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    do = torch.randn_like(o1)
    for g1, g2 in zip(torch.autograd.grad(o1, leaves, do), torch.autograd.grad(o2, copies, do)):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ dropout


def test_dropout_zero_is_the_plain_path():
    q, k, v = make_qkv((1, 2, 50, 32), torch.float32)
    torch.testing.assert_close(attention(q, k, v, dropout_p=0.0), attention(q, k, v), rtol=0, atol=0)


def test_dropout_is_reproducible_with_a_fixed_seed():
    q, k, v = make_qkv((2, 2, 40, 32), torch.float32)
    results = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        o = attention(q, k, v, dropout_p=0.3)
        results.append((o, *torch.autograd.grad(o.sum(), (q, k, v))))
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(results[0][0], results[2][0])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 2, 37, 32), (2, 1, 70, 64)], ids=str)
def test_dropout_matches_reference_with_the_kernels_own_mask(shape, causal):
    p = 0.25
    q, k, v = make_qkv(shape, torch.float32)
    torch.manual_seed(123)
    _, seed = last_seed_of(q, k, v, causal, p)
    B, H, T, _ = shape
    keep = dropout_mask(B, H, T, T, p, seed, device=DEVICE)
    torch.manual_seed(123)  # attention() draws the same seed again
    check(q, k, v, causal, torch.float32, dropout_p=p, keep=keep)


def test_seed_stays_on_the_device():
    """The forward op returns its seed as a one-element int64 tensor on the inputs' device (no host sync, no CPU
    tensor to stop CUDA graphs), drawn from torch's generator: torch.manual_seed reproduces it."""
    q, k, v = (t.detach() for t in make_qkv((1, 1, 8, 16), torch.float32))
    scale = 0.25
    torch.manual_seed(3)
    _, _, seed = attention_module._attention_fwd_op(q, k, v, True, 0.1, scale, 0.0, -1, -1)
    assert seed.device == q.device and seed.dtype == torch.int64 and seed.shape == (1,)
    torch.manual_seed(3)
    assert torch.equal(attention_module._attention_fwd_op(q, k, v, True, 0.1, scale, 0.0, -1, -1)[2], seed)


def test_autotune_key_buckets_sequence_lengths():
    """A prompt of any length up to a power of two shares one autotuning entry (KV-cache prefill)."""
    bucket = attention_module._t_bucket
    assert bucket(513, 513) == bucket(1000, 1000) == bucket(1024, 1) == 1024
    assert bucket(1025, 1025) == 2048 and bucket(1, 1) == 1


def test_dropout_statistics():
    p = 0.4
    B, H, T = 2, 2, 96
    keep = dropout_mask(B, H, T, T, p, seed=2024, device=DEVICE)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma
    other = dropout_mask(B, H, T, T, p, seed=2025, device=DEVICE)
    assert (keep != other).float().mean().item() > 0.4  # different seeds, independent masks
    # different heads and rows do not repeat the same pattern
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])

    # dropout is unbiased: the mean over many seeds approaches the output without dropout, as 1/sqrt(n)
    q, k, v = (t.detach() for t in make_qkv((1, 1, 32, 16), torch.float32))
    o = attention(q, k, v)
    outs = []
    for seed in range(120):
        torch.manual_seed(seed)
        outs.append(attention(q, k, v, dropout_p=p))
    outs = torch.stack(outs)
    err_10 = relative_error(outs[:10].mean(0), o)
    err_120 = relative_error(outs.mean(0), o)
    assert err_120 < 0.15 and err_120 < 0.6 * err_10


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_errors():
    q, k, v = (t.detach() for t in make_qkv((1, 2, 8, 32), torch.float32))
    with pytest.raises(ValueError, match=r"attention: shapes do not match: q \(1, 2, 8, 32\), k \(1, 3, 8, 32\)"):
        attention(q, torch.randn(1, 3, 8, 32, device=DEVICE), v)
    with pytest.raises(ValueError, match=r"k \(1, 3, 8, 32\), v \(1, 2, 8, 32\) \(k and v must be \(B, H_kv"):
        attention(q, torch.randn(1, 3, 8, 32, device=DEVICE), v)  # H_kv = 3 does not divide H = 2
    for D in (44, 264):
        with pytest.raises(ValueError, match=f"attention: head dim {D} is not supported; supported: multiples of 8 "
                                             f"from 8 to 256"):
            x = torch.randn(1, 2, 8, D, device=DEVICE)
            attention(x, x, x)
    with pytest.raises(TypeError, match="attention: q has dtype torch.int64; supported: float32"):
        attention(q.long(), k, v)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"attention: q must be a 4-d tensor \(B, H, T, D\), got \(2, 8, 32\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"dropout_p=1.0 must be in \[0, 1\)"):
        attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="causal attention needs at least as many keys as queries .* Tq=8, Tk=5"):
        attention(q, k[:, :, :5], v[:, :, :5])
    for window in ((3,), (-2, 0), (1.5, 0), "left", (True, 0)):
        with pytest.raises(ValueError, match=r"attention: window=.* must be \(left, right\)"):
            attention(q, k, v, window=window)
    with pytest.raises(ValueError, match="attention: softcap=0.0 must be positive"):
        attention(q, k, v, softcap=0.0)
    with pytest.raises(ValueError, match=r"attention: scale=-0.5 must be positive"):
        attention(q, k, v, scale=-0.5)


def test_cpu_without_interpreter_says_how_to_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="on the CPU they run only through Triton's interpreter"):
        attention(x, x, x)
