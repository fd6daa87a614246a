"""What every benchmark case shares: the device and its sizes, the correctness gate, timing, roofline, metadata.

Timing: warm-up calls first (torch.compile and Triton autotuning happen there, outside the timed region),
then pytest-benchmark times rounds of `inner` calls that cycle through several input sets (so a cache
holding one set cannot flatter the result); on CUDA each round ends with a synchronize, and `inner` is chosen
so a round lasts >= ~10 ms, which makes the synchronize's cost negligible. The figure reported is the median
round divided by `inner`.
"""
import math
import platform
import resource
import time
from datetime import datetime, timezone

import torch

from kernels.testing import relative_error, tolerance
from nanogpt.backends import available_backends, get_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
INTERPRETED_TRITON = not ON_GPU  # on the CPU Triton runs in its interpreter: correct, but says nothing of speed


# rows that were checked but deliberately not timed (Triton under the interpreter); conftest adds them to the JSON
UNTIMED = []


def record_untimed(benchmark, reason):
    """Keep a checked-but-untimed row out of pytest-benchmark's timing table, and in the JSON with its reason."""
    benchmark.extra_info["note"] = reason
    UNTIMED.append({"name": benchmark.name, "group": benchmark.group, "extra_info": dict(benchmark.extra_info)})


def interpreted(name):
    """True for a registry backend whose Triton kernels run in the interpreter here (checked, never timed; no bf16
    tl.dot): the registry says whether a backend runs Triton. False for a row that is no registry backend."""
    return INTERPRETED_TRITON and name in available_backends() and get_backend(name).runs_triton


class WrongResult(AssertionError):
    """A candidate's output or gradient differs from the reference: it is never timed."""


def low_precision_dtype():
    if ON_GPU and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def gate(name, outputs, references, dtype, reductions=()):
    """Fail (WrongResult) unless every output matches its reference within the dtype's tolerance. Outputs whose
    index is in `reductions` (parameter gradients summed over thousands of rows) get the reduction tolerance:
    PyTorch's own low-precision kernels accumulate rounding there too."""
    for i, (out, ref) in enumerate(zip(outputs, references)):
        tol = tolerance(dtype, "matmul", reduction=i in reductions)
        if out.shape != ref.shape:
            raise WrongResult(f"{name}: output {i} has shape {tuple(out.shape)}, reference {tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            raise WrongResult(f"{name}: output {i} has non-finite values: refusing to time a wrong kernel")
        err = relative_error(out, ref)
        if err > tol:
            raise WrongResult(f"{name}: output {i} is off by {err:.2e} relative (tolerance {tol:.0e} for {dtype}): "
                              f"refusing to time a wrong kernel")


def fwd_bwd(fn, inputs, grad_out):
    """Run fn forward (and backward with grad_out if given): (output, *input grads)."""
    if grad_out is None:
        with torch.no_grad():
            return (fn(*inputs),)
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out)
    return (out.detach(), *grads)


def case(benchmark, record, kind, backend, fn, make_inputs, reference, dtype, passes, figure, reductions=()):
    """Gate fn against the reference, then time it (unless Triton is interpreted), then record the figures."""
    inputs, grad_out = make_inputs(0)
    outputs = fwd_bwd(fn, inputs, grad_out if passes == "fwd+bwd" else None)
    expected = reference(inputs, grad_out if passes == "fwd+bwd" else None)
    gate(f"{kind} {backend} {passes} {dtype}", outputs, expected, dtype, reductions)
    del outputs, expected

    timed = not interpreted(backend)
    record(kind=kind, backend=backend, passes=passes, dtype=str(dtype).replace("torch.", ""), timed=timed)
    if not timed:  # correct; but interpreter speed says nothing about the kernel
        record_untimed(benchmark, "Triton interpreter on CPU: checked, not timed")
        return
    sets = [make_inputs(i) for i in range(rotation_count(tensor_bytes(*inputs)))]
    if passes == "fwd":
        seconds = measure(benchmark, torch.no_grad()(fn), [tuple(s) for s, _ in sets])
    else:
        def step(*xs_and_grad):
            *xs, g = xs_and_grad
            out = fn(*xs)
            torch.autograd.grad(out, [t for t in xs if t.requires_grad], g)
        seconds = measure(benchmark, step, [(*s, g) for s, g in sets])
    if seconds is not None:
        benchmark.extra_info.update(figure(seconds))


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def measure(benchmark, fn, input_sets, warmup=3, target_round_s=0.01, rounds=None):
    """Time fn(*inputs) cycling over input_sets; return seconds per call (median), or None when the benchmark
    is disabled (the smoke run without --benchmark, which runs fn once)."""
    if getattr(benchmark, "disabled", False):
        benchmark(fn, *input_sets[0])
        return None
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    sync()
    if ON_GPU:
        return _measure_cuda(benchmark, fn, input_sets, rounds)
    t0 = time.perf_counter()
    fn(*input_sets[0])
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, math.ceil(target_round_s / one)))
    rounds = rounds or 5  # the CPU's rounds (a GPU returned above)
    counter = [0]

    def run_round():
        for _ in range(inner):
            fn(*input_sets[counter[0] % len(input_sets)])
            counter[0] += 1
        sync()

    benchmark.pedantic(run_round, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["calls_per_round"] = inner
    return benchmark.stats.stats.median / inner


def _measure_cuda(benchmark, fn, input_sets, rounds=None):
    """On CUDA: CUDA events around each call, the L2 cache flushed between calls, the median taken
    (triton.testing.do_bench); pytest-benchmark's own rounds still run so that its JSON has the row, but the
    figure reported is do_bench's median."""
    from triton.testing import do_bench
    counter = [0]

    def call():
        fn(*input_sets[counter[0] % len(input_sets)])
        counter[0] += 1

    median_ms = do_bench(call, warmup=25, rep=100, return_mode="median")
    benchmark.pedantic(lambda: (call(), sync()), rounds=rounds or 10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["timing"] = "CUDA events: triton.testing.do_bench median (L2 flushed between calls)"
    benchmark.extra_info["calls_per_round"] = 1
    return median_ms / 1e3


def rotation_count(bytes_per_set):
    """Input sets to cycle through so that together they exceed the last-level cache several times over."""
    cache = 256 * 2**20 if ON_GPU else 64 * 2**20
    return max(1, min(8, math.ceil(cache / max(bytes_per_set, 1))))


def tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_roofline():
    """Measured device limits: a large matmul (bf16 on a GPU, fp32 on a CPU) and a large device copy."""
    if ON_GPU:
        n, dtype, copy_bytes, reps = 8192, low_precision_dtype(), 2**30, 20
    else:
        n, dtype, copy_bytes, reps = 1024, torch.float32, 2**27, 5
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    src = torch.empty(copy_bytes // 4, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)

    def best_time(fn):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    matmul_s = best_time(lambda: a @ b)
    copy_s = best_time(lambda: dst.copy_(src))
    return {
        "matmul_flops": 2 * n**3 / matmul_s,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_n": n,
        "copy_bytes_per_s": 2 * copy_bytes / copy_s,  # read + write
        "copy_bytes": copy_bytes,
    }


def environment():
    import importlib.metadata as md
    try:
        triton_version = md.version("triton")
    except md.PackageNotFoundError:
        triton_version = None
    if ON_GPU:
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "cuda": torch.version.cuda if ON_GPU else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def reset_peak_memory():
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes():
    """Peak GPU memory allocated by torch, or the process's peak resident set size on a CPU."""
    if ON_GPU:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
