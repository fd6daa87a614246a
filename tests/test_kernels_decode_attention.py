"""kernels.decode_attention (split-K decode attention over a KV cache) against a float64 reference.

Ragged lengths are the normal case: every test batch has rows of different lengths, one of them equal to Tq
(the new queries are the whole row) and one equal to Tmax (a full cache); Tmax is no multiple of any block."""
import math

import pytest
import torch

from helpers import DEVICE
from kernels import decode_attention
from kernels.decode_attention import _decode_attention_op, heads_per_program, launch_config, shipped_configs
from kernels.testing import relative_error, tolerance


def reference(q, k, v, lengths, scale=None, softcap=None, window_left=None):
    """Explicit float64 attention: query i of row b (position lengths[b] - Tq + i) sees keys up to its own (and,
    with a window, none more than window_left before it); a kv head serves H / H_kv query heads (GQA)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    Tq, Tmax = q.shape[2], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    q_pos = lengths.long()[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]
    keys = torch.arange(Tmax, device=q.device)[None, None, :]
    visible = keys <= q_pos[:, :, None]
    if window_left is not None:
        visible &= keys >= q_pos[:, :, None] - window_left
    s = s.masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def ragged_lengths(B, Tq, Tmax, seed=0):
    """Row 0: only the new queries; row 1: a full cache; the others anywhere in between."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(Tq, Tmax + 1, (B,), generator=g)
    lengths[0] = Tq
    if B > 1:
        lengths[1] = Tmax
    return lengths.to(torch.int32).to(DEVICE)


def make_inputs(B, H, Tq, Tmax, D, dtype, seed=0, H_kv=None):
    g = torch.Generator().manual_seed(seed)
    H_kv = H if H_kv is None else H_kv
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
               for shape in ((B, H, Tq, D), (B, H_kv, Tmax, D), (B, H_kv, Tmax, D)))
    return q, k, v, ragged_lengths(B, Tq, Tmax, seed)


def check(q, k, v, lengths, dtype, scale=None, num_splits=None, softcap=None, window_left=None):
    if num_splits is None:
        o = decode_attention(q, k, v, lengths, scale=scale, softcap=softcap,
                             window=None if window_left is None else (window_left, 0))
    else:
        o = _decode_attention_op(q, k, v, lengths, scale or 1.0 / math.sqrt(q.shape[-1]), num_splits,
                                 softcap or 0.0, -1 if window_left is None else window_left)
    assert o.dtype == dtype and o.shape == q.shape
    assert torch.isfinite(o).all()
    err = relative_error(o, reference(q, k, v, lengths, scale, softcap, window_left))
    assert err <= tolerance(dtype, "matmul"), f"relative error {err:.2e}"


# every configuration launch_config ships (Tq bucket x head dim bucket), each at an awkward size inside the
# bucket where there is one (Tq 3 in bucket 4, D 48 in bucket 64, ...): the masks on Tq and D are exercised too
def _awkward(n):
    return n if n <= 2 else n - 1


CONFIG_CASES = [(tq, d) for tq, d, _ in shipped_configs()]


@pytest.mark.parametrize("tq,d", CONFIG_CASES, ids=[f"Tq{tq}-D{d}" for tq, d in CONFIG_CASES])
def test_every_shipped_config(tq, d):
    for Tq, D in {(tq, d), (_awkward(tq), _awkward(d))}:
        assert launch_config(Tq, D) == launch_config(tq, d)
        Tmax = 3 * launch_config(Tq, D)["BLOCK_N"] + 5  # no multiple of any block
        q, k, v, lengths = make_inputs(3, 2, Tq, Tmax, D, torch.float32, seed=Tq * 1000 + D)
        check(q, k, v, lengths, torch.float32, num_splits=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 16), (4, 3, 1, 301, 64), (2, 2, 5, 77, 80), (3, 1, 16, 200, 128),
                                   (2, 12, 1, 1024, 64)], ids=str)
def test_dtypes_and_shapes(shape, dtype):
    B, H, Tq, Tmax, D = shape
    q, k, v, lengths = make_inputs(B, H, Tq, Tmax, D, dtype)
    check(q, k, v, lengths, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 40])  # 40 > key blocks: most splits are empty
def test_split_count_does_not_change_the_result(num_splits):
    q, k, v, lengths = make_inputs(3, 2, 2, 333, 32, torch.float32)
    check(q, k, v, lengths, torch.float32, num_splits=num_splits)


def test_custom_scale_and_strided_views():
    """The model's q is a (B, T, H, D).transpose(1, 2) view, and the cache a slice of a bigger buffer."""
    B, H, Tq, Tmax, D = 2, 3, 4, 90, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, Tq, 3 * H * D, generator=g).to(DEVICE)
    q = qkv[..., :H * D].view(B, Tq, H, D).transpose(1, 2)
    cache = torch.randn(2, B, H, Tmax + 7, D, generator=g).to(DEVICE)
    k, v = cache[0, :, :, :Tmax], cache[1, :, :, :Tmax]
    lengths = ragged_lengths(B, Tq, Tmax)
    check(q, k, v, lengths, torch.float32, scale=0.3)
    torch.testing.assert_close(decode_attention(q, k, v, lengths),
                               decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), lengths),
                               rtol=0, atol=0)


def test_keys_past_the_length_are_never_read():
    """Garbage (NaN) past each row's length and in masked positions changes nothing."""
    q, k, v, lengths = make_inputs(3, 2, 3, 150, 64, torch.float32)
    expected = decode_attention(q, k, v, lengths)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k2[b, :, n:] = float("nan")
        v2[b, :, n:] = float("nan")
    torch.testing.assert_close(decode_attention(q, k2, v2, lengths), expected, rtol=0, atol=0)


def test_int64_lengths_and_gradients():
    q, k, v, lengths = make_inputs(2, 2, 3, 40, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = decode_attention(q, k, v, lengths.long())
    o_ref = reference(q, k, v, lengths)
    assert relative_error(o, o_ref) <= tolerance(torch.float32, "matmul")
    do = torch.randn_like(o)
    for name, g, g_ref in zip("qkv", torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v),
                                                                                             do.double())):
        assert relative_error(g, g_ref, scale=do) <= tolerance(torch.float32, "matmul"), f"d{name}"


# GQA ratios 1/2/4/8 and MQA (one kv head for all), at Tq 1 (one program takes up to 16 query heads of a kv
# head) and Tq 3 (rows of several heads x 3 queries, no power of two)
GQA_CASES = [(8, 8), (8, 4), (8, 2), (8, 1), (16, 1), (12, 3)]


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("H,H_kv", GQA_CASES, ids=[f"H{h}-Hkv{k}" for h, k in GQA_CASES])
def test_grouped_query_attention(H, H_kv, Tq):
    q, k, v, lengths = make_inputs(3, H, Tq, 75, 32, torch.float32, seed=H * 10 + H_kv, H_kv=H_kv)
    check(q, k, v, lengths, torch.float32)
    check(q, k, v, lengths, torch.float32, num_splits=3)


def test_heads_per_program():
    assert [heads_per_program(g, 1) for g in (1, 2, 4, 8, 16, 32, 12)] == [1, 2, 4, 8, 16, 16, 12]
    assert [heads_per_program(g, tq) for g, tq in ((8, 2), (8, 3), (6, 5), (4, 16), (12, 5))] == [8, 4, 3, 1, 3]


# windows: 0 (a query sees only its own key), 1, shorter than the cache, longer than it (no effect)
@pytest.mark.parametrize("window_left", [0, 1, 17, 500])
@pytest.mark.parametrize("Tq", [1, 4])
def test_sliding_window(window_left, Tq):
    q, k, v, lengths = make_inputs(3, 4, Tq, 150, 32, torch.float32, seed=window_left, H_kv=2)
    check(q, k, v, lengths, torch.float32, window_left=window_left)
    check(q, k, v, lengths, torch.float32, num_splits=5, window_left=window_left)


def test_keys_before_the_window_are_never_read():
    q, k, v, lengths = make_inputs(3, 2, 2, 150, 32, torch.float32)
    window = (20, 0)
    expected = decode_attention(q, k, v, lengths, window=window)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        first = max(0, n - 2 - window[0])  # the first query's first visible key
        k2[b, :, :first] = float("nan")
        v2[b, :, :first] = float("nan")
    torch.testing.assert_close(decode_attention(q, k2, v2, lengths, window=window), expected, rtol=0, atol=0)


@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
def test_softcap(softcap):
    q, k, v, lengths = make_inputs(2, 4, 2, 90, 64, torch.float32, H_kv=1)
    q = q * 3  # scores large enough that the cap matters
    check(q, k, v, lengths, torch.float32, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_all_options_together(dtype):
    q, k, v, lengths = make_inputs(3, 8, 3, 130, 80, dtype, H_kv=2)
    check(q, k, v, lengths, dtype, softcap=20.0, window_left=33)


def test_gradients_with_options():
    """GQA sums the group's gradients per kv head; softcap and window enter the backward too."""
    q, k, v, lengths = make_inputs(2, 4, 3, 40, 16, torch.float32, H_kv=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = decode_attention(q * 4, k, v, lengths, softcap=2.0, window=(5, 0))
    o_ref = reference(q * 4, k, v, lengths, softcap=2.0, window_left=5)
    assert relative_error(o, o_ref) <= tolerance(torch.float32, "matmul")
    do = torch.randn_like(o)
    for name, g, g_ref in zip("qkv", torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v),
                                                                                             do.double())):
        assert g.shape == g_ref.shape
        assert relative_error(g, g_ref, scale=do) <= tolerance(torch.float32, "matmul"), f"d{name}"


def test_opcheck():
    q, k, v, lengths = make_inputs(2, 2, 2, 37, 32, torch.float32)
    torch.library.opcheck(_decode_attention_op, (q.requires_grad_(), k.requires_grad_(), v, lengths, 0.2, 2, 0.0, -1))
    torch.library.opcheck(_decode_attention_op, (q.detach(), k.detach(), v, lengths, 0.2, 1, 0.0, -1))
    q, k, v, lengths = make_inputs(2, 4, 2, 37, 32, torch.float32, H_kv=2)
    torch.library.opcheck(_decode_attention_op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                                 lengths, 0.2, 2, 5.0, 6))


def test_compile_fullgraph():
    """A decode step (write the new keys into a static cache, attend, advance the lengths) traces in one graph."""
    B, H, Tmax, D = 2, 2, 33, 16

    def step(q, k_new, v_new, k_cache, v_cache, lengths):
        pos = lengths.long()[:, None, None, None].expand(B, H, 1, D)
        k_cache.scatter_(2, pos, k_new)
        v_cache.scatter_(2, pos, v_new)
        lengths += 1
        return decode_attention(q, k_cache, v_cache, lengths)

    g = torch.Generator().manual_seed(0)
    q, k_new, v_new = (torch.randn(B, H, 1, D, generator=g).to(DEVICE) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, H, Tmax, D, generator=g).to(DEVICE) for _ in range(2))
    lengths = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    state = [t.clone() for t in (k_cache, v_cache, lengths)]
    eager = step(q, k_new, v_new, *state)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(q, k_new, v_new, k_cache, v_cache, lengths)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert lengths.tolist() == [4, 21] and torch.equal(k_cache, state[0])


def test_bad_input_errors():
    q, k, v, lengths = make_inputs(2, 2, 1, 8, 32, torch.float32)
    with pytest.raises(ValueError, match=r"decode_attention: lengths must be a \(B,\) = \(2,\) int32 tensor"):
        decode_attention(q, k, v, lengths[:1])
    with pytest.raises(ValueError, match="lengths must be"):
        decode_attention(q, k, v, lengths.float())
    with pytest.raises(ValueError, match=r"decode_attention: 17 new queries; supported: 1 to 16"):
        decode_attention(torch.randn(2, 2, 17, 32, device=DEVICE), k, v, lengths)
    with pytest.raises(ValueError, match=r"decode_attention: 9 new queries but a cache of only 8 positions"):
        decode_attention(torch.randn(2, 2, 9, 32, device=DEVICE), k, v, lengths)
    with pytest.raises(ValueError, match=r"shapes do not match: q \(2, 2, 1, 32\), k \(2, 3, 8, 32\)"):
        decode_attention(q, torch.randn(2, 3, 8, 32, device=DEVICE), v, lengths)
    with pytest.raises(ValueError, match="softcap=0.0 must be positive"):
        decode_attention(q, k, v, lengths, softcap=0.0)
    for window in ((4, 2), (-2, 0), 4, (1.5, 0)):
        with pytest.raises(ValueError, match="must be \\(left, right\\) with left an int"):
            decode_attention(q, k, v, lengths, window=window)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        decode_attention(q, k.half(), v, lengths)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        decode_attention(q, k, v, lengths.to("meta"))
    with pytest.raises(ValueError, match="must be contiguous in its last"):
        decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, lengths)


def test_cpu_without_interpreter_says_how_to_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, lengths = (t.cpu() for t in make_inputs(1, 1, 1, 4, 16, torch.float32))
    with pytest.raises(RuntimeError, match="on the CPU they run only through Triton's interpreter"):
        decode_attention(q, k, v, lengths)
