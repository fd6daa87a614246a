"""Every launch config the kernels can choose on a GPU, executed (on a CPU: through Triton's interpreter, which
otherwise launches one small fixed config) at small shapes with tails, in float32 and float16.

The config lists are read from the kernel modules, so a config added there is tested here the day it is added.
Attention: each entry of FWD_CONFIGS / BWD_CONFIGS is forced onto its kernel with
`kernels.attention.forced_configs`, at every BLOCK_D it is shipped for among 64, 128 (the model's head dims) and 256,
with T and Tk no multiple of any block. LayerNorm / GELU: their launch parameters are a function of the row width,
so `launch_config` is made to answer as on a GPU, at widths that fall in each block size's bracket with a tail.
"""
import functools
import importlib

import pytest
import torch

from helpers import DEVICE, attention_reference
from kernels.testing import relative_error, tolerance

attention_module = importlib.import_module("kernels.attention")  # `kernels.attention` is also the function
layer_norm_module = importlib.import_module("kernels.layer_norm")
gelu_module = importlib.import_module("kernels.gelu")

DTYPES = [torch.float32, torch.float16]
HEAD_DIM_FOR_BLOCK_D = {64: 48, 128: 80, 256: 200}  # padded head dims: D < BLOCK_D exercises the masked columns


def _config_id(c):
    blocks = "-".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in c.items() if k.startswith("BLOCK_"))
    return f"{blocks}-w{c['num_warps']}-s{c['num_stages']}"


def _attention_cases():
    cases = []
    for kernel, configs in (("fwd", attention_module.FWD_CONFIGS), ("bwd", attention_module.BWD_CONFIGS)):
        for config in configs:
            for block_d in sorted(set(config["block_ds"]) & set(HEAD_DIM_FOR_BLOCK_D)):
                cases.append(pytest.param(kernel, config, block_d,
                                          id=f"{kernel}-{_config_id(config)}-D{HEAD_DIM_FOR_BLOCK_D[block_d]}"))
    return cases


def _shipped(kernel, config, block_d, dropout):
    configs = attention_module.FWD_CONFIGS if kernel == "fwd" else attention_module.BWD_CONFIGS
    return any(config in attention_module.configs_for(configs, block_d, dropout, arch) for arch in ("sm_90", "sm_80"))


def _problems(kernel, config, block_d, dtype):
    """(Tq, Tk, causal, dropout_p) to run a config at: causal T=100 where it is shipped without dropout (and, in
    float32, 45 queries x 100 keys, not causal); causal with dropout where it is shipped with dropout (float32, or
    float16 when that is all it is shipped for)."""
    problems = []
    if _shipped(kernel, config, block_d, False):
        problems.append((100, 100, True, 0.0))
        if dtype == torch.float32:
            problems.append((45, 100, False, 0.0))
    if _shipped(kernel, config, block_d, True) and (dtype == torch.float32 or not problems):
        problems.append((100, 100, True, 0.25))
    return problems


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel, config, block_d", _attention_cases())
def test_attention_config(kernel, config, block_d, dtype):
    """Each config's output (fwd) or gradients (the one-launch backward: dQ, dK, dV) against float64, at the
    problems of _problems."""
    head_dim = HEAD_DIM_FOR_BLOCK_D[block_d]
    for Tq, Tk, causal, dropout_p in _problems(kernel, config, block_d, dtype):
        torch.manual_seed(0)
        q = torch.randn(1, 2, Tq, head_dim, dtype=dtype, device=DEVICE, requires_grad=True)
        k, v = (torch.randn(1, 2, Tk, head_dim, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
        with attention_module.forced_configs(**{kernel: config}):
            o, seed = attention_module.last_seed_of(q, k, v, causal=causal, dropout_p=dropout_p)
            do = torch.randn_like(o)
            grads = torch.autograd.grad(o, (q, k, v), do)
        keep = (attention_module.dropout_mask(1, 2, Tq, Tk, dropout_p, seed, device=DEVICE) if dropout_p
                else None)
        o_ref = attention_reference(q, k, v, causal, keep=keep, dropout_p=dropout_p)
        grads_ref = torch.autograd.grad(o_ref, (q, k, v), do.double())
        tol = tolerance(dtype, "matmul")
        what = f"{kernel} {_config_id(config)} Tq={Tq} Tk={Tk} causal={causal} dropout={dropout_p}"
        assert relative_error(o, o_ref) <= tol, f"output, {what}"
        checked = {"fwd": "", "bwd": "qkv"}[kernel]
        for name, g, g_ref in zip("qkv", grads, grads_ref):
            if name in checked:
                assert relative_error(g, g_ref, scale=do) <= tol, f"d{name}, {what}"


def test_forced_configs_reach_the_launch():
    """The hook the tests above rely on: a forced config is the one launched (an invalid one fails), and the
    autotuner's choice comes back afterwards."""
    q = torch.randn(1, 1, 40, 32, device=DEVICE)
    bad = dict(attention_module.FWD_CONFIGS[0], BLOCK_M=48)  # not a power of two: tl.arange refuses it
    with pytest.raises(Exception, match="power of 2|power of two"):
        with attention_module.forced_configs(fwd=bad):
            attention_module.attention(q, q, q)
    torch.testing.assert_close(attention_module.attention(q, q, q), attention_reference(q, q, q, True).to(q.dtype))
    with pytest.raises(ValueError, match="unknown kernel"):
        with attention_module.forced_configs(dq=bad):
            pass


@pytest.mark.parametrize("kind, own, walk", [("fwd", "BLOCK_M", "BLOCK_N"), ("bwd", "BLOCK_OWN", "BLOCK_WALK")])
def test_block_shape_invariant_is_enforced(kind, own, walk):
    """The kernels' loops walk the owned block's causal diagonal in steps of the other block, so the owned block
    must be a multiple of the step (and a dropout tile draws four keys per Philox call: steps of 16 at least): a
    config that breaks it is refused where the lists are built, loudly."""
    bad = {own: 64, walk: 128, "num_warps": 4, "num_stages": 3, "block_ds": (64,)}
    with pytest.raises(ValueError, match="breaks the kernel's block-shape invariant"):
        attention_module._check_block_shapes(kind, [bad])
    for configs in (attention_module.FWD_CONFIGS if kind == "fwd" else attention_module.BWD_CONFIGS,):
        assert all(c[own] % c[walk] == 0 for c in configs)


def test_every_head_dim_has_a_config():
    """The skips left every (BLOCK_D, dropout, arch) at least one config, and a list with none is refused at
    import."""
    for configs in (attention_module.FWD_CONFIGS, attention_module.BWD_CONFIGS):
        for block_d in attention_module.ALL_BLOCK_DS:
            for dropout in (False, True):
                for arch in ("sm_90", "sm_80"):
                    assert attention_module.configs_for(configs, block_d, dropout, arch), (block_d, dropout, arch)
    only_64 = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, block_ds=(64,), skip={})
    with pytest.raises(ValueError, match="no fwd config is shipped for BLOCK_D=16"):
        attention_module._check_coverage("fwd", [only_64])


# ------------------------------------------------------------------------------------------------ LayerNorm, GELU

# one width in each bracket of the GPU launch (LayerNorm BLOCK_N 128 / 1024 / 2048 / 4096; GELU 128 and 1024-wide
# column blocks, one to three of them), none a power of two
ROW_WIDTHS = [100, 700, 1600, 3000]


@pytest.fixture
def gpu_launch(monkeypatch):
    """LayerNorm and GELU launch with the parameters they use on a GPU."""
    monkeypatch.setattr(layer_norm_module, "launch_config",
                        functools.partial(layer_norm_module.launch_config, interpreter=False))
    monkeypatch.setattr(gelu_module, "launch_config", functools.partial(gelu_module.launch_config, interpreter=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", ROW_WIDTHS)
def test_layer_norm_gpu_config(gpu_launch, N, dtype):
    launch = layer_norm_module.launch_config(N, torch.empty((), dtype=dtype).element_size())
    M = 2 * launch["BLOCK_M"] + 3  # a partial row tile
    torch.manual_seed(0)
    x = (torch.randn(M, N, dtype=torch.float64) * 2 + 1).to(dtype).to(DEVICE).requires_grad_()
    w = torch.randn(N, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    b = torch.randn(N, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    y = layer_norm_module.layer_norm(x, w, b)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = torch.nn.functional.layer_norm(xd, (N,), wd, bd)
    grads_ref = torch.autograd.grad(y_ref, (xd, wd, bd), dy.double())
    tol = tolerance(dtype)
    assert relative_error(y, y_ref) <= tol, f"y {launch}"
    for name, g, g_ref, summed in zip(("dx", "dw", "db"), grads, grads_ref, (False, True, True)):
        assert relative_error(g, g_ref, scale=dy) <= tolerance(dtype, reduction=summed), f"{name} {launch}"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", ROW_WIDTHS)
def test_gelu_gpu_config(gpu_launch, N, dtype, approximate):
    launch = gelu_module.launch_config(N)
    M = 2 * launch["BLOCK_M"] + 3  # more than one program (row tile), the last one partial
    torch.manual_seed(0)
    x = torch.randn(M, N, dtype=torch.float64).mul(3).to(dtype).to(DEVICE).requires_grad_()
    bias = torch.randn(N, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    y = gelu_module.gelu(x, bias, approximate)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias), dy)
    xd, bd = (t.detach().double().requires_grad_() for t in (x, bias))
    y_ref = torch.nn.functional.gelu(xd + bd, approximate=approximate)
    grads_ref = torch.autograd.grad(y_ref, (xd, bd), dy.double())
    tol = tolerance(dtype)
    assert relative_error(y, y_ref) <= tol
    assert relative_error(grads[0], grads_ref[0], scale=dy) <= tol
    assert relative_error(grads[1], grads_ref[1], scale=dy) <= tolerance(dtype, reduction=True)


def test_gpu_launch_parameters_differ_from_the_interpreters():
    """The fixture above matters: on the CPU the launchers pick other (interpreter) parameters by themselves."""
    if DEVICE == "cuda":
        pytest.skip("on a GPU the launchers use the GPU parameters anyway")
    assert layer_norm_module.launch_config(100, 4) != layer_norm_module.launch_config(100, 4, interpreter=False)
    assert gelu_module.launch_config(100) != gelu_module.launch_config(100, interpreter=False)
