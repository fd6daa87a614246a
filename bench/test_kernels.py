"""Kernel cases: attention, LayerNorm, GELU; forward and forward+backward; every backend the device has.

Reported per row (extra_info): median seconds per call, TFLOP/s (attention) or GB/s (LayerNorm, GELU),
and that figure as a fraction of the measured roofline (matmul FLOP/s, copy bytes/s).
FLOPs: attention forward 4*B*H*T^2*D (half of it when causal), backward 2.5x forward.
Bytes: what the kernel must move at least — LayerNorm/GELU forward reads x and writes y (2 passes over the
activation), backward reads x and dy and writes dx (3 passes): forward+backward is 5 passes.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.common import DEVICE, ON_GPU, case, fwd_bwd, interpreted, low_precision_dtype
from nanogpt.backends import available_backends, get_backend, naive_attention, naive_gelu, naive_layer_norm

LOW = low_precision_dtype()
DTYPES = [torch.float32, LOW]

if ON_GPU:
    ATTENTION_SHAPES = [(16, 12, 1024, 64), (4, 16, 4096, 128)]  # GPT-2 124M; a long, wide-head case
    ROW_SHAPES = {"layer_norm": [(16384, 768), (16384, 1600)], "gelu": [(16384, 3072)]}
else:
    ATTENTION_SHAPES = [(2, 4, 128, 64)]
    ROW_SHAPES = {"layer_norm": [(2048, 768)], "gelu": [(1024, 3072)]}


# ------------------------------------------------------------------------------------------------ backends
# Every backend of the registry (nanogpt/backends.py) is a row under its registry name: a backend added with
# register_backend is benchmarked with no change here. Beside them: each SDPA backend pinned explicitly, FlexAttention
# (compiled, causal block mask: the Triton-generated attention a user would pick instead of ours) where the installed
# torch has it, and torch.compile of the naive reference.

def _sdpa_with(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attention


def _flex_with(group, window):
    """FlexAttention, compiled, with a causal block mask (a sliding window of `window` keys when given) and GQA
    when group > 1: the Triton-generated attention a user would pick instead of ours."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def visible(b, h, q_idx, kv_idx):
        ok = q_idx >= kv_idx
        return ok & (q_idx - kv_idx < window) if window else ok

    def attention(q, k, v, dropout_p=0.0, **options):  # the block mask already holds the window option
        T = q.shape[-2]
        if T not in masks:
            masks[T] = create_block_mask(visible, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
        return compiled(q, k, v, block_mask=masks[T], enable_gqa=group > 1)
    return attention


def _has_flex_attention():
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_COMPILED = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _registry(part):
    """{registry name: a factory of that backend's `part` ("attention", "layer_norm" or "gelu")}."""
    return {name: (lambda name=name: getattr(get_backend(name), part)) for name in available_backends()}


SDPA_PINNED = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"] if ON_GPU else \
    ["FLASH_ATTENTION", "MATH"]

ATTENTION_BACKENDS = {
    **{name: (lambda f=f: (lambda q, k, v: f()(q, k, v, 0.0))) for name, f in _registry("attention").items()},
    **{f"sdpa[{b.split('_')[0].lower()}]": (lambda b=b: _sdpa_with(b)) for b in SDPA_PINNED},
    **({"flex_attention": lambda: _flex_with(group=1, window=None)} if ON_GPU and _has_flex_attention() else {}),
    "compile(naive)": lambda: (lambda q, k, v: _compiled(naive_attention)(q, k, v)),
}
LAYER_NORM_BACKENDS = {
    **{name: (lambda f=f: (lambda x, w, b: f()(x, w, b, 1e-5))) for name, f in _registry("layer_norm").items()},
    "compile(naive)": lambda: _compiled(naive_layer_norm),
}
GELU_BACKENDS = {
    **{name: (lambda f=f: (lambda x, b: f()(x, b, "none"))) for name, f in _registry("gelu").items()},
    "compile(naive)": lambda: _compiled(naive_gelu),
}


# ------------------------------------------------------------------------------------------------ helpers

def _fraction(value, key, benchmark):
    roof = benchmark.extra_info.get(key)
    return value / roof if roof else None


# ------------------------------------------------------------------------------------------------ cases

def _backend_or_skip(table, name, probe):
    fn = table[name]()
    try:
        probe(fn)
    except (RuntimeError, NotImplementedError) as e:  # e.g. an SDPA backend this device lacks
        pytest.skip(f"{name} unavailable here: {str(e).splitlines()[0][:120]}")
    return fn


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", list(ATTENTION_BACKENDS))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention(benchmark, record, shape, backend, dtype, passes):
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter cannot run tl.dot on bfloat16 (triton issue #11584): checked on a GPU")
    B, H, T, D = shape
    if backend == "naive" and T * T * B * H * 4 > 8 * 2**30:
        pytest.skip("naive attention would materialize more than 8 GiB of scores")
    benchmark.group = f"attention {passes} {'x'.join(map(str, shape))} {str(dtype)[6:]}"

    def make_inputs(seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        qkv = [torch.randn(shape, device=DEVICE, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]
        return qkv, torch.randn(shape, device=DEVICE, dtype=dtype, generator=g)

    probe_inputs, _ = make_inputs(0)
    fn = _backend_or_skip(ATTENTION_BACKENDS, backend, lambda f: f(*[t.detach() for t in probe_inputs]))

    def reference(inputs, grad_out):
        # fp32 math on the same (rounded) inputs, one batch at a time to bound memory
        outs = []
        for b in range(B):
            xs = [t[b:b + 1].detach().float().requires_grad_() for t in inputs]
            outs.append(fwd_bwd(lambda q, k, v: naive_attention(q, k, v), xs,
                                None if grad_out is None else grad_out[b:b + 1].float()))
        return [torch.cat(parts) for parts in zip(*outs)]

    fwd_flops = 4 * B * H * T * T * D * 0.5  # causal: half the scores
    flops = fwd_flops * (1 if passes == "fwd" else 3.5)

    def figure(seconds):
        tflops = flops / seconds / 1e12
        return {"median_s": seconds, "tflops": tflops, "shape": list(shape), "flops": flops,
                "roofline_fraction": _fraction(tflops * 1e12, "roofline_matmul_flops", benchmark)}

    case(benchmark, record, "attention", backend, fn, make_inputs, reference, dtype, passes, figure)


def _rowwise_case(benchmark, record, kind, table, shape, backend, dtype, passes):
    M, N = shape
    benchmark.group = f"{kind} {passes} {M}x{N} {str(dtype)[6:]}"

    def make_inputs(seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        x = torch.randn(shape, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
        params = [torch.randn(N, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
                  for _ in range(2 if kind == "layer_norm" else 1)]
        return [x, *params], torch.randn(shape, device=DEVICE, dtype=dtype, generator=g)

    fn = table[backend]()
    naive = naive_layer_norm if kind == "layer_norm" else naive_gelu

    def reference(inputs, grad_out):
        xs = [t.detach().double().requires_grad_() for t in inputs]
        return fwd_bwd(naive, xs, None if grad_out is None else grad_out.double())

    elt = torch.empty((), dtype=dtype).element_size()
    moved = M * N * elt * (2 if passes == "fwd" else 5)

    def figure(seconds):
        gbps = moved / seconds / 1e9
        return {"median_s": seconds, "gbps": gbps, "shape": list(shape), "bytes": moved,
                "roofline_fraction": _fraction(gbps * 1e9, "roofline_copy_bytes_per_s", benchmark)}

    # outputs: y, dx, then the parameter gradients (sums over all M rows)
    case(benchmark, record, kind, backend, fn, make_inputs, reference, dtype, passes, figure, reductions=(2, 3))


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", list(LAYER_NORM_BACKENDS))
@pytest.mark.parametrize("shape", ROW_SHAPES["layer_norm"], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm(benchmark, record, shape, backend, dtype, passes):
    _rowwise_case(benchmark, record, "layer_norm", LAYER_NORM_BACKENDS, shape, backend, dtype, passes)


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", list(GELU_BACKENDS))
@pytest.mark.parametrize("shape", ROW_SHAPES["gelu"], ids=lambda s: "x".join(map(str, s)))
def test_gelu(benchmark, record, shape, backend, dtype, passes):
    _rowwise_case(benchmark, record, "gelu", GELU_BACKENDS, shape, backend, dtype, passes)


# ------------------------------------------------------------------------------------------------ attention options
# Issue 21's options at GPT-2 124M's shape: GQA (4 query heads per kv head) and a causal sliding window. Rows: every
# registry backend with the option (sdpa: enable_gqa, or the window as an explicit boolean mask: what a user of
# F.scaled_dot_product_attention writes), and FlexAttention with the same block mask (GQA through enable_gqa), where
# the installed torch has it. FLOPs count the visible (query, key) pairs only, so a window's skipped tiles show as
# time saved, not as lower TFLOP/s.

OPTIONS_SHAPE = (16, 12, 1024, 64) if ON_GPU else (2, 4, 128, 64)
OPTIONS_CASES = {"gqa4": dict(group=4, window=None),
                 f"window{256 if ON_GPU else 32}": dict(group=1, window=256 if ON_GPU else 32)}


def _options_backends():
    table = {name: (lambda name=name: get_backend(name).attention) for name in available_backends()}
    if ON_GPU and _has_flex_attention():
        table["flex_attention"] = "flex"
    return table


OPTIONS_BACKENDS = _options_backends()


def visible_pairs(T, window=None):
    """(query, key) pairs a causal query block sees, with a sliding window of `window` keys (itself included)."""
    if not window:
        return T * (T + 1) // 2
    return sum(min(i + 1, window) for i in range(T))


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", list(OPTIONS_BACKENDS))
@pytest.mark.parametrize("option", list(OPTIONS_CASES))
def test_attention_options(benchmark, record, option, backend, dtype, passes):
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter cannot run tl.dot on bfloat16 (triton issue #11584): checked on a GPU")
    B, H, T, D = OPTIONS_SHAPE
    group, window = OPTIONS_CASES[option]["group"], OPTIONS_CASES[option]["window"]
    kv_shape = (B, H // group, T, D)
    options = dict(window=(window - 1, 0) if window else None)
    benchmark.group = f"attention {option} {passes} {'x'.join(map(str, OPTIONS_SHAPE))} {str(dtype)[6:]}"
    entry = OPTIONS_BACKENDS[backend]
    attention = _flex_with(group, window) if entry == "flex" else entry()

    def fn(q, k, v):
        return attention(q, k, v, 0.0, **options)

    def make_inputs(seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        qkv = [torch.randn(s, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
               for s in (OPTIONS_SHAPE, kv_shape, kv_shape)]
        return qkv, torch.randn(OPTIONS_SHAPE, device=DEVICE, dtype=dtype, generator=g)

    def reference(inputs, grad_out):
        outs = []
        for b in range(B):
            xs = [t[b:b + 1].detach().float().requires_grad_() for t in inputs]
            outs.append(fwd_bwd(lambda q, k, v: naive_attention(q, k, v, **options), xs,
                                None if grad_out is None else grad_out[b:b + 1].float()))
        return [torch.cat(parts) for parts in zip(*outs)]

    fwd_flops = 4 * B * H * visible_pairs(T, window) * D
    flops = fwd_flops * (1 if passes == "fwd" else 3.5)

    def figure(seconds):
        tflops = flops / seconds / 1e12
        return {"median_s": seconds, "tflops": tflops, "shape": list(OPTIONS_SHAPE), "kv_heads": H // group,
                "window": window, "flops": flops,
                "roofline_fraction": _fraction(tflops * 1e12, "roofline_matmul_flops", benchmark)}

    case(benchmark, record, "attention", backend, fn, make_inputs, reference, dtype, passes, figure)
