"""The steps of the GPU verdict (bench/gpu.py), one per process: `python3 -m bench.gpu_steps STEP --result FILE`.

Each step adds its measures one at a time to a Recorder, which rewrites FILE after every one, so a step killed at
its cap (or by a CUDA fault) still leaves what it measured before. With --plan every step runs the same code at toy
sizes on the CPU: the kernels through Triton's interpreter, fp32/fp16 instead of bf16 (the interpreter has no bf16
`tl.dot`), torch.compile with the "eager" backend (dynamo traces, inductor is left out: minutes on 2 cores).
Optional packages (FlexAttention, cuDNN/flash SDPA, pytest, pytest-benchmark, the inductor) are probed before use:
a missing one is a measure "not available (why)", never a traceback.
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """A step's measures, rewritten to `path` after each one."""

    def __init__(self, path, plan, out_dir):
        self.path, self.plan, self.out = Path(path), plan, Path(out_dir)
        self.device = "cuda" if torch.cuda.is_available() and not plan else "cpu"
        self.data = {"measures": [], "info": {}}
        self.deadline = None  # time.monotonic() at which the orchestrator kills this step
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def measure(self, key, value, unit="", label=None, **info):
        """A figure (value None: not measured, info["why"] says why)."""
        m = {"key": key, "value": value, "unit": unit, "label": label or key, **info}
        self.data["measures"].append(m)
        self.save()
        shown = "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else value)
        print(f"measure {label or key}: {shown} {unit}" + (f" ({info['why']})" if info.get("why") else ""),
              flush=True)

    def set(self, key, value, unit="", label=None, **info):
        """Like measure, but replacing an earlier figure of the same key (running counts)."""
        self.data["measures"] = [m for m in self.data["measures"] if m["key"] != key]
        self.data["measures"].append({"key": key, "value": value, "unit": unit, "label": label or key, **info})
        self.save()

    def missing(self, key, why, label=None):
        self.measure(key, None, label=label, why=why)

    def info(self, **fields):
        self.data["info"].update(fields)
        self.save()

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    @property
    def low(self):
        """The low-precision dtype of this run: bf16 on the GPU, fp16 in the plan (the interpreter's dots)."""
        return torch.float16 if self.plan else torch.bfloat16

    def compile(self, fn, **kwargs):
        return torch.compile(fn, backend="eager" if self.plan else "inductor", **kwargs)


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def time_fn(rec, fn, reps=None):
    """Seconds per call: the median of CUDA-event timings with the L2 flushed (triton.testing.do_bench) on the GPU;
    the median of a few wall-clock calls in the plan (which only checks the code path)."""
    if rec.device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=reps or 100, return_mode="median") / 1e3
    t0 = time.perf_counter()
    fn()  # callers have run fn once already (a check, or a warm-up)
    return time.perf_counter() - t0


def copy_bytes_per_s(rec):
    nbytes = 2**30 if rec.device == "cuda" else 2**24
    src = torch.empty(nbytes // 4, device=rec.device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(rec, lambda: dst.copy_(src))


# ------------------------------------------------------------------------------------------------ 1. env

def step_env(rec):
    import importlib.metadata as md
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "pytest", "pytest-benchmark", "hypothesis", "matplotlib"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not available"
    rec.info(versions=versions, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    if rec.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        rec.info(device=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2**30, 1), l2_mb=getattr(p, "L2_cache_size", 0) / 1e6)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                  "power.limit,temperature.gpu", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            rec.info(nvidia_smi=smi.stdout.strip() or smi.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            rec.info(nvidia_smi=f"not available ({first_line(e)})")
    else:
        rec.info(device=f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(json.dumps(rec.data["info"], indent=1, default=str), flush=True)
    n = 8192 if rec.device == "cuda" else 256
    dtype = rec.low if rec.device == "cuda" else torch.float32
    a = torch.randn(n, n, device=rec.device, dtype=dtype)
    b = torch.randn(n, n, device=rec.device, dtype=dtype)
    rec.measure("env.matmul_tflops", 2 * n**3 / time_fn(rec, lambda: a @ b) / 1e12, "TFLOP/s",
                label=f"matmul {n}^3 {str(dtype)[6:]}", headline=True)
    rec.measure("env.copy_gbps", copy_bytes_per_s(rec) / 1e9, "GB/s", label="device copy (read+write)", headline=True)
    from nanogpt.hardware import device_peak_flops
    peak = device_peak_flops(rec.device)
    rec.measure("env.peak_tflops", peak / 1e12 if peak else None, "TFLOP/s", label="datasheet dense bf16 peak",
                **({} if peak else {"why": "device not in nanogpt/hardware.py"}))


# ------------------------------------------------------------------------------------------------ 2. correctness

def attention_cases(plan):
    """(label, shape (B,H,T,D), dtype name, causal, dropout_p, path, autotuned) in order of value: a step cut at its
    cap keeps the counts of the cases before the cut. Only GPT-2's bf16 call autotunes (as the model runs it); the
    others launch the first shipped config for their head dim, so the step compiles tens of kernels, not hundreds."""
    if plan:
        return [("GPT-2", (1, 2, 33, 32), "low", True, 0.0, "tma", True),
                ("T=1", (1, 1, 1, 32), "fp32", True, 0.0, "tma", False),
                ("T=7", (1, 2, 7, 48), "low", False, 0.0, "tma", False),
                ("dropout", (1, 1, 20, 32), "fp32", True, 0.25, "tma", False),
                ("pointers", (1, 2, 17, 32), "low", False, 0.0, "pointers", False)]
    cases = [("GPT-2", (16, 12, 1024, 64), "bf16", True, 0.0, "tma", True)]
    # every T with every D, causal alternating: the six (D, causal) kernels, each at T=1 and at a tail length
    for i, (T, D) in enumerate((T, D) for T in (1, 7, 257, 1000) for D in (64, 96, 128)):
        cases.append((f"T={T}", (2, 3, T, D), "bf16", (i + T) % 2 == 1, 0.0, "tma", False))
    cases += [("dropout", (2, 3, 257, 64), "bf16", True, 0.1, "tma", False),
              ("pointers", (2, 3, 257, 96), "bf16", False, 0.0, "pointers", False),
              ("pointers", (2, 3, 1000, 128), "bf16", True, 0.0, "pointers", False),
              ("pointers", (2, 3, 1, 64), "bf16", True, 0.0, "pointers", False),
              ("pointers dropout", (2, 3, 257, 64), "bf16", True, 0.1, "pointers", False),
              ("GPT-2", (16, 12, 1024, 64), "fp16", True, 0.0, "tma", False),
              ("T=257", (2, 3, 257, 96), "fp16", False, 0.0, "tma", False),
              ("dropout", (1, 2, 1000, 128), "fp16", False, 0.2, "tma", False)]
    return cases


def _configs(rec, D, dropout, autotuned):
    """The launch configs of a case: the autotuner's, or the first shipped config for this head dim (the
    interpreter's own config in the plan). A config list this code does not understand falls back to autotuning."""
    import contextlib
    import importlib

    from kernels._common import arch_of, block_d_of
    m = importlib.import_module("kernels.attention")
    if autotuned:
        return contextlib.nullcontext("autotuned")
    try:
        if rec.plan:
            fwd, bwd = m.INTERPRETER_FWD_CONFIG, m.INTERPRETER_BWD_CONFIG
        else:
            arch, block_d = arch_of(rec.device), block_d_of(D)
            fwd = m.configs_for(m.FWD_CONFIGS, block_d, dropout, arch)[0]
            bwd = m.configs_for(m.BWD_CONFIGS, block_d, dropout, arch)[0]
        return m.forced_configs(fwd=fwd, bwd=bwd)
    except Exception as e:  # noqa: BLE001
        print(f"(cannot force a config: {first_line(e)}; autotuning)", flush=True)
        return contextlib.nullcontext("autotuned")


def _dtype(rec, name):
    return {"low": rec.low, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _qkv(rec, shape, dtype, path, seed, transposed=False):
    """q, k, v (and dO) of `shape`; path "pointers": views whose row stride is not a multiple of 16 bytes, which
    the launch must read through masked pointers (TMA needs 16-byte strides); transposed: the model's
    (B, T, H, D).transpose(1, 2) views."""
    g = torch.Generator(device=rec.device).manual_seed(seed)
    B, H, T, D = shape
    pad = 4 if path == "pointers" else 0
    ts = []
    for _ in range(4):
        if transposed:
            ts.append(torch.randn((B, T, H, D), device=rec.device, generator=g).to(dtype).transpose(1, 2))
            continue
        full = torch.randn((B, H, T, D + pad), device=rec.device, generator=g).to(dtype)
        ts.append(full[..., :D])
    return [t.requires_grad_() for t in ts[:3]], ts[3]


def check_attention(rec, label, shape, dtype, causal, p, path, seed):
    from kernels import attention
    from kernels._common import use_tma
    from kernels.attention import dropout_mask, last_seed_of
    from kernels.testing import relative_error, tolerance
    (q, k, v), do = _qkv(rec, shape, dtype, path, seed, transposed=label == "GPT-2")
    used = "tma" if use_tma(q, k, v) else "pointers"
    hopper = rec.device == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    expected = path if hopper else "pointers"  # TMA needs Hopper: elsewhere every case takes the pointer path
    keep = None
    if p > 0:
        torch.manual_seed(seed)
        _, drawn = last_seed_of(q.detach(), k.detach(), v.detach(), causal, p)
        B, H, T, _ = shape
        keep = dropout_mask(B, H, T, T, p, drawn, device=rec.device)
        torch.manual_seed(seed)  # attention() draws the same seed again
    o = attention(q, k, v, causal=causal, dropout_p=p)
    grads = torch.autograd.grad(o, (q, k, v), do)
    errors = {}
    # the float64 reference one batch row at a time (GPT-2's shape: 12 x 1024^2 scores per row)
    for b in range(shape[0]):
        xs = [t[b:b + 1].detach().double().requires_grad_() for t in (q, k, v)]
        s = (xs[0] @ xs[1].transpose(-2, -1)) / math.sqrt(shape[-1])
        if causal:
            T = shape[2]
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=rec.device).tril(), float("-inf"))
        pr = torch.softmax(s, dim=-1)
        if keep is not None:
            pr = pr * keep[b:b + 1] / (1.0 - p)
        ref = pr @ xs[2]
        ref_grads = torch.autograd.grad(ref, xs, do[b:b + 1].double())
        for name, a, e in (("o", o[b:b + 1], ref), *zip(("dq", "dk", "dv"), (g[b:b + 1] for g in grads),
                                                        ref_grads)):
            scale = None if name == "o" else do[b:b + 1]
            errors[name] = max(errors.get(name, 0.0), relative_error(a, e, scale=scale))
    tol = tolerance(dtype, "matmul")
    worst = max(errors, key=errors.get)
    return used, expected, errors[worst], worst, tol


def _row_checks(rec):
    """(name, function) of the row-wise kernels, the loss head and decode attention, each in the low dtype."""
    from kernels import add_layer_norm, decode_attention, gelu, layer_norm, linear_cross_entropy
    from kernels.testing import REDUCTION_FACTOR, relative_error, tolerance
    dev, low = rec.device, rec.low
    M, N = (64, 96) if rec.plan else (4096, 768)

    def grads_err(out, ref, inputs, ref_inputs, dy, kind, reductions=(), scale_by_dy=True):
        """The worst relative error of the output and each input gradient (a gradient's denominator is at least
        ||dy|| where it may be near zero; parameter gradients summed over the rows get REDUCTION_FACTOR)."""
        tol = tolerance(low, kind)
        gs = torch.autograd.grad(out, inputs, dy)
        rgs = torch.autograd.grad(ref, ref_inputs, dy.double())
        errs = [relative_error(out, ref)]
        for i, (g, r) in enumerate(zip(gs, rgs), start=1):
            err = relative_error(g, r, scale=dy if scale_by_dy else None)
            errs.append(err / REDUCTION_FACTOR if i in reductions else err)
        return max(errs), tol

    def leaf(*shape, dtype=low):
        return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_()

    def double(ts):
        return [t.detach().double().requires_grad_() for t in ts]

    def ln():
        x, w, b = leaf(M, N), leaf(N), leaf(N)
        xr, wr, br = double((x, w, b))
        ref = torch.nn.functional.layer_norm(xr, (N,), wr, br, 1e-5)
        return grads_err(layer_norm(x, w, b), ref, (x, w, b), (xr, wr, br), torch.randn_like(x), "pointwise",
                         (2, 3))

    def add_ln():
        x, r, w, b = leaf(M, N), leaf(M, N), leaf(N), leaf(N)
        xr, rr, wr, br = double((x, r, w, b))
        h, y = add_layer_norm(x, r, w, b)
        href = xr + rr
        ref = torch.nn.functional.layer_norm(href, (N,), wr, br, 1e-5)
        out, refs = torch.cat([h.flatten(), y.flatten()]), torch.cat([href.flatten(), ref.flatten()])
        return grads_err(out, refs, (x, r, w, b), (xr, rr, wr, br), torch.randn_like(out), "pointwise", (3, 4))

    def gelu_bias():
        x, b = leaf(M, 4 * N), leaf(4 * N)
        xr, br = double((x, b))
        ref = torch.nn.functional.gelu(xr + br)
        return grads_err(gelu(x, b), ref, (x, b), (xr, br), torch.randn_like(x), "pointwise", (2,))

    def loss_head():
        V = 1000 if rec.plan else 50304
        x, w = leaf(M, N, dtype=low), leaf(V, N, dtype=low)
        t = torch.randint(V, (M,), device=dev)
        xr, wr = double((x, w))
        ref = torch.nn.functional.cross_entropy(xr @ wr.T, t)
        loss = linear_cross_entropy(x, w, t)
        return grads_err(loss, ref, (x, w), (xr, wr), torch.ones((), device=dev), "matmul", (2,), scale_by_dy=False)

    def decode():
        B, H, Tmax, D = (2, 2, 40, 32) if rec.plan else (8, 12, 1024, 64)
        Tq = 1
        q = torch.randn(B, H, Tq, D, device=dev, dtype=low)
        k = torch.randn(B, H, Tmax, D, device=dev, dtype=low)
        v = torch.randn(B, H, Tmax, D, device=dev, dtype=low)
        lengths = torch.randint(1, Tmax + 1, (B,), device=dev, dtype=torch.int32)
        y = decode_attention(q, k, v, lengths)
        from nanogpt.backends import naive_decode_attention
        ref = naive_decode_attention(q.double(), k.double(), v.double(), lengths)
        return relative_error(y, ref), tolerance(low, "matmul")

    return [("layer_norm", ln), ("add_layer_norm", add_ln), ("gelu+bias", gelu_bias), ("loss head", loss_head),
            ("decode attention", decode)]


def step_correctness(rec):
    """Each case against float64; the count of cases off their tolerance is the step's verdict. The counts are
    rewritten after every case, so a cut leaves them (with "cases run" saying how far it got)."""
    counts = {"passed": 0, "failed": 0, "worst": 0.0, "run": 0}
    cases = attention_cases(rec.plan)
    rows = _row_checks(rec)
    total = len(cases) + len(rows)

    def record(ok, ratio):
        counts["run"] += 1
        counts["passed" if ok else "failed"] += 1
        counts["worst"] = max(counts["worst"], ratio)
        rec.set("correctness.passed", counts["passed"], "cases", label="cases within tolerance", headline=True)
        rec.set("correctness.failed", counts["failed"], "cases", label="cases off tolerance or crashed")
        rec.set("correctness.run", f"{counts['run']} of {total}", label="cases run", headline=True)
        rec.set("correctness.worst_error_vs_tolerance", counts["worst"], "x", label="worst error / its tolerance")

    # GPT-2's bf16 call first, then the row-wise kernels, loss head and decode attention in bf16, then the rest
    order = [("attention", c) for c in cases[:1]] + [("rows", r) for r in rows] + [("attention", c) for c in cases[1:]]
    for i, (kind, case) in enumerate(order):
        if kind == "rows":
            name, fn = case
            try:
                err, tol = fn()
            except Exception as e:  # noqa: BLE001  a crash is a failed case, and the next case still runs
                print(f"FAIL {name} {str(rec.low)[6:]}: {first_line(e)}", flush=True)
                traceback.print_exc()
                record(False, float("inf"))
                continue
            record(err <= tol, err / tol)
            print(f"{'ok  ' if err <= tol else 'FAIL'} {name} {str(rec.low)[6:]}: {err:.2e} (tolerance {tol:.0e})",
                  flush=True)
            continue
        label, shape, dtype_name, causal, p, path, autotuned = case
        dtype = _dtype(rec, dtype_name)
        name = (f"attention {label} {'x'.join(map(str, shape))} {str(dtype)[6:]} {'causal' if causal else 'full'}"
                f"{f' dropout={p}' if p else ''} {path}")
        try:
            with _configs(rec, shape[-1], p > 0, autotuned) as how:
                used, expected, err, worst, tol = check_attention(rec, label, shape, dtype, causal, p, path, seed=i)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {name}: {first_line(e)}", flush=True)
            traceback.print_exc()
            record(False, float("inf"))
            if "CUDA error" in str(e) or "illegal" in str(e).lower():
                break  # the context is gone: every later case would fail the same way
            continue
        ok = err <= tol and used == expected
        record(ok, err / tol)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: worst {worst} {err:.2e} (tolerance {tol:.0e}), loads through "
              f"{used}, {'autotuned' if how == 'autotuned' else 'first shipped config'}", flush=True)
    if counts["failed"]:
        raise SystemExit(1)


# ------------------------------------------------------------------------------------------------ 3. attention

def _attention_backends(rec):
    """{name: attention(q, k, v) or the reason it is not available}."""
    import torch.nn.functional as F

    from kernels import attention
    backends = {"triton": lambda q, k, v: attention(q, k, v, causal=True)}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, b in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                        ("efficient", "EFFICIENT_ATTENTION")):
            def sdpa(q, k, v, b=getattr(SDPBackend, b)):
                with sdpa_kernel(b):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            backends[f"sdpa[{name}]"] = sdpa
    except ImportError as e:
        backends["sdpa[flash]"] = f"not available ({first_line(e)})"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = rec.compile(flex_attention, dynamic=False) if not rec.plan else flex_attention
        masks = {}

        def flex_causal(q, k, v):
            T = q.shape[-2]
            if T not in masks:
                masks[T] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=q.device)
            return flex(q, k, v, block_mask=masks[T])
        backends["flex"] = flex_causal
    except ImportError as e:
        backends["flex"] = f"not available ({first_line(e)})"
    return backends


def step_attention(rec):
    shapes = {"gpt2": (16, 12, 1024, 64), "long": (4, 16, 4096, 128)}
    if rec.plan:
        shapes = {"gpt2": (1, 2, 32, 32), "long": (1, 1, 64, 64)}
    dtype = rec.low
    backends = _attention_backends(rec)
    table = []
    for tag, shape in shapes.items():
        B, H, T, D = shape
        fwd_flops = 4 * B * H * T * T * D / 2  # causal: half the scores (FlashAttention's counting)
        g = torch.Generator(device=rec.device).manual_seed(0)
        q, k, v, do = (torch.randn(shape, device=rec.device, dtype=dtype, generator=g) for _ in range(4))
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        figures = {}
        for name, fn in backends.items():
            for passes, flops in (("fwd", fwd_flops), ("fwd_bwd", 3.5 * fwd_flops)):
                key = f"attention.{passes}.{tag}.{name}"
                label = f"{name} {passes.replace('_', '+')} {'x'.join(map(str, shape))}"
                if isinstance(fn, str):
                    rec.missing(key, fn.removeprefix("not available (").rstrip(")"), label=label)
                    continue
                try:
                    if passes == "fwd":
                        run = torch.no_grad()(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
                        run()
                    else:
                        def run(fn=fn, qkv=qkv, do=do):
                            torch.autograd.grad(fn(*qkv), qkv, do)
                        run()
                    seconds = time_fn(rec, run)
                except Exception as e:  # noqa: BLE001  an SDPA backend this device or dtype lacks
                    rec.missing(key, f"not available: {first_line(e)}", label=label)
                    continue
                figures[(name, passes)] = flops / seconds / 1e12
                rec.measure(key, figures[(name, passes)], "TFLOP/s", label=label, headline=name == "triton")
                table.append((tag, name, passes, figures[(name, passes)]))
            _record_ratios(rec, tag, figures, done=False)  # as soon as they are known: FlexAttention compiles last
        _record_ratios(rec, tag, figures, done=True)
    print("\n| shape | backend | passes | TFLOP/s | / sdpa[flash] |\n|---|---|---|---|---|", flush=True)
    for tag, name, passes, tflops in table:
        flash = next((t for tg, n, p, t in table if (tg, n, p) == (tag, "sdpa[flash]", passes)), None)
        print(f"| {tag} | {name} | {passes} | {tflops:.1f} | {f'{tflops / flash:.2f}' if flash else '-'} |",
              flush=True)


def _record_ratios(rec, tag, figures, done):
    """triton's TFLOP/s over sdpa[flash]'s and sdpa[cudnn]'s, once both are known; when done, the missing ones."""
    recorded = {m["key"] for m in rec.data["measures"]}
    for passes in ("fwd", "fwd_bwd"):
        for ref in ("flash", "cudnn"):
            key = f"attention.{passes}.{tag}.vs_{ref}"
            if key in recorded:
                continue
            label = f"triton / sdpa[{ref}] {passes.replace('_', '+')} {tag}"
            mine, theirs = figures.get(("triton", passes)), figures.get((f"sdpa[{ref}]", passes))
            if mine and theirs:
                rec.measure(key, mine / theirs, "x", label=label)
            elif done:
                rec.missing(key, f"{'triton' if not mine else f'sdpa[{ref}]'} not timed", label=label)


# ------------------------------------------------------------------------------------------------ 4. train

def _gpt2(rec, attn, **overrides):
    from nanogpt.model import GPT, GPTConfig
    cfg = dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=False)
    if rec.plan:
        cfg.update(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32)
    cfg.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg, attn=attn)).to(rec.device)


def _train_one(rec, rt, attn, B, T, warmup, steps):
    """(seconds per step, MFU or None, peak GiB or None) of one backend; everything it allocated is freed on return,
    so the next backend's peak memory starts from the same floor."""
    model = _gpt2(rec, attn)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), rt.device_type)
    step_model = rec.compile(model)
    x = torch.randint(model.config.vocab_size, (B, T), device=rec.device)
    y = torch.randint(model.config.vocab_size, (B, T), device=rec.device)

    def step():
        with rt.autocast:
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    rec.sync()
    print(f"attn={attn}: compile + {warmup} warm-up steps {time.perf_counter() - t0:.1f} s", flush=True)
    if rec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    rec.sync()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if rec.device == "cuda" else None
    return dt, model.estimate_mfu(B, dt), peak


def step_train(rec):
    from nanogpt.runtime import setup_runtime
    B, T, warmup, steps = (16, 1024, 5, 10) if not rec.plan else (2, 32, 1, 1)
    rt = setup_runtime(rec.device, "bfloat16" if not rec.plan else "float32", seed=0)
    results = {}
    for attn in ("sdpa", "triton"):
        label = f"attn={attn}"
        try:
            dt, mfu, peak = _train_one(rec, rt, attn, B, T, warmup, steps)
        except Exception as e:  # noqa: BLE001  one backend failing leaves the other's figures
            traceback.print_exc()
            for what in ("ms_per_iter", "tokens_per_s", "mfu", "peak_memory_gib"):
                rec.missing(f"train.{what}.{attn}", first_line(e), label=f"{label} {what}")
            continue
        finally:
            torch._dynamo.reset()
            if rec.device == "cuda":
                torch.cuda.empty_cache()
        results[attn] = (B * T / dt, peak)
        rec.measure(f"train.ms_per_iter.{attn}", dt * 1e3, "ms", label=f"{label} ms/iter")
        rec.measure(f"train.tokens_per_s.{attn}", B * T / dt, "tok/s", label=f"{label} tokens/s", headline=True)
        if mfu is None:
            rec.missing(f"train.mfu.{attn}", "device peak unknown", label=f"{label} MFU")
        else:
            rec.measure(f"train.mfu.{attn}", mfu, "%", label=f"{label} MFU (dense bf16 peak)", headline=True)
        if peak is None:
            rec.missing(f"train.peak_memory_gib.{attn}", "CPU: no allocator peak", label=f"{label} peak memory")
        else:
            rec.measure(f"train.peak_memory_gib.{attn}", peak, "GiB", label=f"{label} peak memory", headline=True)
    if "sdpa" in results and "triton" in results:
        rec.measure("train.tokens_per_s.triton_vs_sdpa", results["triton"][0] / results["sdpa"][0], "x",
                    label="tokens/s triton / sdpa")
        if results["sdpa"][1]:
            rec.measure("train.peak_memory.triton_vs_sdpa", results["triton"][1] / results["sdpa"][1], "x",
                        label="peak memory triton / sdpa")
        else:
            rec.missing("train.peak_memory.triton_vs_sdpa", "CPU: no allocator peak", label="peak memory ratio")
    else:
        for key in ("train.tokens_per_s.triton_vs_sdpa", "train.peak_memory.triton_vs_sdpa"):
            rec.missing(key, "a backend failed: see gpu.log")


# ------------------------------------------------------------------------------------------------ 5. rowwise

def step_rowwise(rec):
    import torch.nn.functional as F

    from kernels import gelu, layer_norm, linear_cross_entropy
    from nanogpt.backends import naive_gelu, naive_layer_norm
    dev, low = rec.device, rec.low
    copy = copy_bytes_per_s(rec)
    rec.measure("rowwise.copy_gbps", copy / 1e9, "GB/s", label="device copy (read+write)", headline=True)
    M = 16384 if not rec.plan else 64

    def fwd_bwd(fn, inputs, dy):
        def run():
            torch.autograd.grad(fn(*inputs), inputs, dy)
        return run

    for kind, N, candidates in (
            ("layer_norm", 768, {"triton": lambda x, w, b: layer_norm(x, w, b),
                                 "eager": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
                                 "compile": rec.compile(naive_layer_norm)}),
            ("gelu", 3072, {"triton": lambda x, b: gelu(x, b),
                            "eager": lambda x, b: F.gelu(x + b),
                            "compile": rec.compile(naive_gelu)})):
        N = N if not rec.plan else 96
        x = torch.randn(M, N, device=dev, dtype=low, requires_grad=True)
        params = [torch.randn(N, device=dev, dtype=low, requires_grad=True) for _ in range(2 if kind == "layer_norm"
                                                                                           else 1)]
        dy = torch.randn_like(x)
        moved = 5 * M * N * x.element_size()  # fwd reads x, writes y; bwd reads x, dy, writes dx
        gbps = {}
        for name, fn in candidates.items():
            key = f"rowwise.{kind}.{name}_gbps"
            label = f"{kind} fwd+bwd {name} {M}x{N}"
            try:
                run = fwd_bwd(fn, [x, *params], dy)
                run()
                gbps[name] = moved / time_fn(rec, run) / 1e9
            except Exception as e:  # noqa: BLE001  e.g. no inductor: "not available"
                rec.missing(key, f"not available: {first_line(e)}", label=label)
                continue
            rec.measure(key, gbps[name], "GB/s", label=label, headline=name == "triton")
        if "triton" in gbps:
            for ref in ("eager", "compile"):
                key = f"rowwise.{kind}.vs_{ref}"
                if ref in gbps:
                    rec.measure(key, gbps["triton"] / gbps[ref], "x", label=f"{kind} triton / {ref}")
                else:
                    rec.missing(key, f"{ref} not timed", label=f"{kind} triton / {ref}")
            rec.measure(f"rowwise.{kind}.copy_fraction", gbps["triton"] * 1e9 / copy, "%",
                        label=f"{kind} triton, share of copy bandwidth")

    # loss head: fused kernel vs F.cross_entropy(x @ W.T): time and peak memory of one forward+backward
    N, C, V = (16384, 768, 50304) if not rec.plan else (64, 32, 512)
    x = torch.randn(N, C, device=dev, dtype=low, requires_grad=True)
    w = torch.randn(V, C, device=dev, dtype=low, requires_grad=True)
    t = torch.randint(V, (N,), device=dev)
    heads = {"triton": lambda: linear_cross_entropy(x, w, t),
             "eager": lambda: F.cross_entropy((x @ w.T).float(), t)}
    seconds, peaks = {}, {}
    for name, fn in heads.items():
        def run(fn=fn):
            torch.autograd.grad(fn(), (x, w))
        try:
            run()
            seconds[name] = time_fn(rec, run)
            if dev == "cuda":
                rec.sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run()
                rec.sync()
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as e:  # noqa: BLE001
            rec.missing(f"rowwise.loss_head.{name}_ms", first_line(e), label=f"loss head {name}")
            continue
        rec.measure(f"rowwise.loss_head.{name}_ms", seconds[name] * 1e3, "ms",
                    label=f"loss head fwd+bwd {name} {N}x{C}x{V}")
        if name in peaks:
            rec.measure(f"rowwise.loss_head.{name}_peak_mib", peaks[name], "MiB", label=f"loss head {name} peak")
    if len(seconds) == 2:
        rec.measure("rowwise.loss_head.time_vs_eager", seconds["triton"] / seconds["eager"], "x",
                    label="loss head time triton / eager", headline=True)
    if len(peaks) == 2:
        rec.measure("rowwise.loss_head.memory_vs_eager", peaks["triton"] / peaks["eager"], "x",
                    label="loss head peak memory triton / eager", headline=True)


# ------------------------------------------------------------------------------------------------ 6. decode

def step_decode(rec):
    from nanogpt.generate import bytes_read, generate
    from nanogpt.runtime import setup_runtime
    new, batches = (128, (1, 8)) if not rec.plan else (2, (1, 2))
    rt = setup_runtime(rec.device, "bfloat16" if not rec.plan else "float32", seed=0)
    copy = copy_bytes_per_s(rec)
    tokens = {}
    for attn in ("sdpa", "triton"):
        try:
            model = _gpt2(rec, attn).eval()
        except Exception as e:  # noqa: BLE001
            rec.missing(f"decode.b1.{attn}.tokens_per_s", first_line(e))
            continue
        for B in batches:
            key = f"decode.b{B}.{attn}"
            label = f"decode attn={attn} batch {B}"
            try:
                idx = torch.randint(model.config.vocab_size, (B, 16), device=rec.device)
                g = torch.Generator(device=rec.device).manual_seed(0)
                with torch.no_grad(), rt.autocast:
                    t0 = time.perf_counter()
                    generate(model, idx, new, top_k=200, compile=not rec.plan, generator=g)  # compile, graphs
                    rec.sync()
                    print(f"{label}: warm-up (compile, CUDA graph capture) {time.perf_counter() - t0:.1f} s",
                          flush=True)
                    stats = {}
                    t0 = time.perf_counter()
                    generate(model, idx, new, top_k=200, compile=not rec.plan, generator=g, stats=stats)
                    rec.sync()
                    dt = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rec.missing(f"{key}.tokens_per_s", first_line(e), label=f"{label} tokens/s")
                continue
            tokens[(attn, B)] = B * new / dt
            rec.measure(f"{key}.tokens_per_s", B * new / dt, "tok/s", label=f"{label} tokens/s", headline=True)
            rec.measure(f"{key}.copy_fraction", bytes_read(model, stats, B) / dt / copy, "%",
                        label=f"{label}, share of copy bandwidth")
        del model
        torch._dynamo.reset()
    for B in batches:
        key = f"decode.b{B}.triton_vs_sdpa"
        if ("triton", B) in tokens and ("sdpa", B) in tokens:
            rec.measure(key, tokens[("triton", B)] / tokens[("sdpa", B)], "x", label=f"decode b{B} triton / sdpa")
        else:
            rec.missing(key, "a backend failed: see gpu.log")


# ------------------------------------------------------------------------------------------------ 7. inspect

def step_inspect(rec):
    from kernels.inspect import ARCHS
    if rec.device == "cuda":
        arch = "sm_%d%d" % torch.cuda.get_device_capability()
        select = []
    else:
        arch, select = "sm_90", ["--kernel", "layer_norm_sum_partials"]  # the plan: a kernel of 3 rows
    if arch not in ARCHS:
        rec.missing("inspect.flagged", f"kernels.inspect knows no {arch} (it knows {', '.join(ARCHS)})")
        return
    json_path = rec.out / f"inspect-{arch}.json"
    jobs = 1 if rec.plan else min(16, os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "kernels.inspect", "--arch", arch, "--jobs", str(jobs),
           "--json", str(json_path), "--markdown", str(rec.out / f"inspect-{arch}.md"), *select]
    print("$ " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if not json_path.exists():
        rec.missing("inspect.flagged", f"kernels.inspect exited {rc} without its JSON")
        raise SystemExit(1)
    rows = json.loads(json_path.read_text())["rows"]
    rec.measure("inspect.rows", len(rows), "rows", label=f"inspect {arch} rows", headline=True)
    from kernels.inspect import problems_of
    flagged = [r for r in rows if problems_of(r)]
    rec.measure("inspect.flagged", len(flagged), "rows",
                label=f"inspect {arch} rows over the limits, spilling or off wgmma")
    if rc != 0:
        raise SystemExit(rc)


# ------------------------------------------------------------------------------------------------ 8. tests, bench

def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _pytest(rec, args, key_prefix):
    """Run pytest in its own process group until the step's limit (less a margin to record the result); the counts
    come from its last line, or, when it is cut, from its progress characters (-q: "." passed, "F" failed, ...)."""
    import signal
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            lines.append(line)
    import threading
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        rc = proc.wait(timeout=max(1.0, rec.deadline - time.monotonic() - 10) if rec.deadline else None)
    except subprocess.TimeoutExpired:
        cut = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(timeout=5)
    last = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|errors?)\b", line)), "")
    if last and not cut:
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
        passed = counts.get("passed", 0)
        failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
        why = {}
    else:
        progress = "".join(line.split(" [")[0] for line in lines
                           if re.fullmatch(r"[.FEsxX]+( +\[ *\d+%\])?\s*", line))
        passed, failed = progress.count("."), progress.count("F") + progress.count("E")
        why = {"why": "cut at the step's limit: counted from pytest's progress" if cut else f"pytest exited {rc}"}
    rec.measure(f"{key_prefix}.passed", passed, "tests", label=f"{key_prefix} passed", headline=True, **why)
    rec.measure(f"{key_prefix}.failed", failed if (last or cut or rc == 0) else max(failed, 1), "tests",
                label=f"{key_prefix} failed or errors", **why)
    return rc


# the test files that say most about the GPU first (pytest runs files in the order given); test_inspect.py is left
# to the inspect step, which compiles the same configs for the device's own architecture
GPU_FIRST_TESTS = ["tests/test_kernels_attention.py", "tests/test_kernels_layer_norm.py", "tests/test_kernels_gelu.py",
                   "tests/test_kernels_linear_cross_entropy.py", "tests/test_kernels_decode_attention.py",
                   "tests/test_kernels_rotary.py", "tests/test_kernels_compile.py", "tests/test_kernel_configs.py",
                   "tests/test_model.py", "tests/test_model_options.py", "tests/test_generate.py"]


def step_tests(rec):
    if not _has("pytest"):
        rec.missing("tests.failed", "pytest is not available")
        return
    if rec.plan:
        args = ["tests/test_hardware.py"]
    else:
        first = [f for f in GPU_FIRST_TESTS if (ROOT / f).exists()]
        args = first + ["tests/", "--ignore=tests/test_inspect.py", "--maxfail=50"]
        if not _has("hypothesis"):
            args.append("--ignore=tests/test_fuzz.py")
    _pytest(rec, args, "tests")


def step_bench(rec):
    if not _has("pytest") or not _has("pytest_benchmark"):
        rec.missing("bench.failed", "pytest-benchmark is not available")
        return
    # pytest-benchmark writes its JSON at the end only: the kernel cases (what a cut run would lose least of)
    files = ["bench/test_gate.py"] if rec.plan else ["bench/test_kernels.py", "bench/test_loss_head.py"]
    _pytest(rec, [*files, "--benchmark", f"--benchmark-json={rec.out / 'bench.json'}"], "bench")


STEPS = {"env": step_env, "correctness": step_correctness, "attention": step_attention, "train": step_train,
         "rowwise": step_rowwise, "decode": step_decode, "inspect": step_inspect, "tests": step_tests,
         "bench": step_bench}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_steps")
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--result", required=True, help="the step's JSON, rewritten after every measure")
    p.add_argument("--out", default=".", help="the results folder (for the files a step writes)")
    p.add_argument("--plan", action="store_true", help="toy sizes on the CPU")
    p.add_argument("--limit", type=float, default=None, help="seconds the step may run (its cap)")
    args = p.parse_args(argv)
    rec = Recorder(args.result, args.plan, args.out)
    rec.deadline = time.monotonic() + args.limit if args.limit else None
    if not args.plan and rec.device != "cuda":
        rec.data["error"] = "no CUDA GPU (use --plan on a CPU)"
        rec.save()
        print("error: no CUDA GPU (use --plan on a CPU)", file=sys.stderr)
        return 2
    try:
        STEPS[args.step](rec)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001  recorded in the step's JSON; the run goes on to the next step
        traceback.print_exc()
        rec.data["error"] = first_line(e)
        rec.save()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
