"""The GPT's loss head (lm_head + cross-entropy) per backend, at GPT-2's vocabulary; and a training step's peak memory.

Rows (group "loss head"): each registered backend's `loss_head` forward+backward on (N, C) activations against a
(50304, C) weight: median seconds, and the peak memory of one forward+backward above what its inputs hold, beside
the size of the fp32 logits it may avoid. A backend without a fused head (naive, sdpa) runs the model's
linear_loss_head, which builds the logits (F.linear + F.cross_entropy); triton's fused head,
kernels.linear_cross_entropy, never does.

Peak memory of one call: the bytes torch's allocations hold at once above what was held before, the figure a GPU
reports as torch.cuda.max_memory_allocated() (read there through bench.common's helpers). On a CPU it comes from
the profiler's allocation and free events (torch.profiler, profile_memory=True), which see every tensor allocated
inside the custom ops too; bench.common.peak_memory_bytes() is the process's lifetime peak RSS there, which cannot
tell one case from the next. Like the GPU figure, it leaves out what is not a torch tensor: the Triton
interpreter's numpy temporaries (registers and shared memory on a GPU).

`python -m bench.test_loss_head` measures the CPU goal of the fused loss head: the peak memory of one training
step (forward, backward, AdamW) of a 2-layer, 128-wide GPT with vocabulary 50304 and batch 8 x 256, per backend
(and, for a backend with a fused head, once more with fused_loss_head=False: the same kernels but the logits),
each in a fresh process, after a warm-up step (AdamW's state): torch's allocations as above, and the resident
set's high-water mark (VmHWM reset through /proc/self/clear_refs, minus the resident set before the step), which
counts everything, the interpreter's temporaries included (they count against triton). The processes start with
MALLOC_MMAP_THRESHOLD_=65536, so every block of 64 KiB or more is its own mapping and leaves the resident set when
freed. test_train_step_peak_memory_cpu (with --benchmark) runs the same measurement and checks that a backend's
step with its fused head peaks lower than its step with fused_loss_head=False, by both measures, by at least the
logits and their gradient (2 x 8 x 256 x 50304 x 4 bytes).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.common import (
    DEVICE,
    ON_GPU,
    gate,
    interpreted,
    low_precision_dtype,
    measure,
    peak_memory_bytes,
    record_untimed,
    reset_peak_memory,
    sync,
)
from nanogpt.backends import available_backends, capped, get_backend, linear_loss_head
from nanogpt.model import GPT, GPTConfig

VOCAB = 50304  # GPT-2's 50257, padded to a multiple of 64
if ON_GPU:
    ROWS, WIDTH = 16 * 1024, 768  # GPT-2 124M at batch 16 x 1024
    DTYPES = [torch.float32, low_precision_dtype()]
else:
    ROWS, WIDTH = 256, 128  # the interpreter runs every tile through numpy: a small batch
    DTYPES = [torch.float32]


def _status_kib(field):
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def allocator_peak_bytes(fn):
    """Peak bytes held by torch's allocations made while fn() runs (live at once), like the GPU's
    max_memory_allocated: from the profiler's allocation/free events (CPU), or the CUDA allocator's counters."""
    if ON_GPU:
        sync()
        base = torch.cuda.memory_allocated()
        reset_peak_memory()
        fn()
        sync()
        return peak_memory_bytes() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:  # nbytes: + for an allocation, - for a free
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def rss_peak_bytes(fn):
    """CPU: the resident set's high-water mark while fn() runs, above the resident set before it: everything the
    process touched, numpy temporaries of the Triton interpreter included. Reliable only in a process started
    with MALLOC_MMAP_THRESHOLD_=65536 (else glibc may reuse freed heap memory without growing the resident set)."""
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def loss_head_of(backend_name):
    return get_backend(backend_name).loss_head or linear_loss_head


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", available_backends())
def test_loss_head(benchmark, record, backend, dtype):
    benchmark.group = f"loss head fwd+bwd {ROWS}x{WIDTH}x{VOCAB} {str(dtype)[6:]}"
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter cannot run tl.dot on bfloat16 (triton issue #11584): checked on a GPU")
    _loss_head_case(benchmark, record, backend, loss_head_of(backend), linear_loss_head, dtype)


def _loss_head_case(benchmark, record, name, head, reference_head, dtype, kind_extra=None):
    """Check `head` against `reference_head` in fp32 on the same (rounded) inputs, measure its peak memory, and
    time it unless its Triton is interpreted: the row `name`."""
    def make_inputs(seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        x = torch.randn(ROWS, WIDTH, device=DEVICE, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(VOCAB, WIDTH, device=DEVICE, generator=g) * WIDTH ** -0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, VOCAB, (ROWS,), device=DEVICE, generator=g)
        targets[::7] = -1  # some ignored rows, as padding would give
        return x, w, targets

    def run(loss_head, x, w, targets):
        _, loss = loss_head(x, w, targets, ignore_index=-1)
        return (loss.detach(), *torch.autograd.grad(loss, (x, w)))

    def fwd_bwd(x, w, targets):
        return run(head, x, w, targets)

    # correctness gate: loss, dx, dW against the reference in fp32 on the same (rounded) inputs; dW sums over rows
    inputs = make_inputs(0)
    expected = run(reference_head, *[t.detach().float().requires_grad_() if t.is_floating_point() else t
                                     for t in inputs])
    gate(f"loss head {name} {dtype}", fwd_bwd(*inputs), expected, dtype, reductions=(2,))
    del expected

    peak = allocator_peak_bytes(lambda: fwd_bwd(*inputs))
    timed = not interpreted(name)
    record(kind="loss_head", backend=name, passes="fwd+bwd", dtype=str(dtype)[6:], timed=timed,
           shape=[ROWS, WIDTH, VOCAB], peak_memory_bytes=peak, logits_fp32_bytes=ROWS * VOCAB * 4,
           peak_memory_method="cuda max_memory_allocated" if ON_GPU else "torch.profiler allocation events",
           **(kind_extra or {}))
    if not timed:
        record_untimed(benchmark, "Triton interpreter on CPU: checked and memory measured, not timed")
        return
    seconds = measure(benchmark, fwd_bwd, [make_inputs(i) for i in range(2)])
    if seconds is not None:
        flops = 6 * ROWS * VOCAB * WIDTH  # logits, dx, dW (the fused head recomputes the logits: 8, counted as 6)
        benchmark.extra_info.update({"median_s": seconds, "tflops": flops / seconds / 1e12, "flops": flops})


# ------------------------------------------------------------------------------------------------
# the loss head with issue 21's options on (label smoothing 0.1, PaLM's z-loss 1e-4, Gemma's final-logit softcap
# 30): the fused kernel (triton's row: kernels.linear_cross_entropy, through the interpreter on a CPU) against the
# unfused PyTorch a user writes (the logits, capped, F.cross_entropy with label_smoothing, plus z * lse^2 over the
# counted rows), eager and compiled. Same figures as test_loss_head.

LOSS_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)


def unfused_loss_with_options(x, w, targets, ignore_index=-1):
    logits = capped(F.linear(x, w).float(), LOSS_OPTIONS["softcap"])
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=LOSS_OPTIONS["label_smoothing"])
    counted = targets != ignore_index
    z = torch.logsumexp(logits[counted], dim=-1).square().mean() if counted.any() else logits.sum() * 0
    return None, loss + LOSS_OPTIONS["z_loss"] * z


def fused_loss_with_options(x, w, targets, ignore_index=-1):
    import kernels  # the kernel itself: the registry's loss_head takes the model's options only (softcap)
    return None, kernels.linear_cross_entropy(x, w, targets, ignore_index=ignore_index, **LOSS_OPTIONS)


_COMPILED_UNFUSED = []


def _compiled_unfused(*args, **kwargs):
    if not _COMPILED_UNFUSED:
        _COMPILED_UNFUSED.append(torch.compile(unfused_loss_with_options))
    return _COMPILED_UNFUSED[0](*args, **kwargs)


# "triton" is the registry name of the backend this kernel belongs to, so that the row is checked but not timed
# where its Triton runs in the interpreter (bench.common.interpreted)
LOSS_OPTION_HEADS = {"triton": fused_loss_with_options, "unfused": unfused_loss_with_options,
                     "compile(unfused)": _compiled_unfused}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_name", list(LOSS_OPTION_HEADS))
def test_loss_head_with_options(benchmark, record, head_name, dtype):
    benchmark.group = f"loss head smoothing+z-loss+softcap fwd+bwd {ROWS}x{WIDTH}x{VOCAB} {str(dtype)[6:]}"
    if interpreted(head_name) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter cannot run tl.dot on bfloat16 (triton issue #11584): checked on a GPU")
    _loss_head_case(benchmark, record, head_name, LOSS_OPTION_HEADS[head_name], unfused_loss_with_options, dtype,
                    kind_extra={"options": "label_smoothing=0.1 z_loss=1e-4 softcap=30"})


# ------------------------------------------------------------------------------------------------
# a training step's peak memory per backend, each in a fresh process (CPU; on a GPU, test_train_step's rows
# record torch.cuda.max_memory_allocated over their timed steps)

STEP_MODEL = dict(n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=VOCAB, bias=False, dropout=0.0)
STEP_BATCH = 8


def _one_step_peak(attn, fused_loss_head=True):
    """In this process: build the model, take one warm-up step (AdamW's state), then measure the second step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**STEP_MODEL, attn=attn, fused_loss_head=fused_loss_head))
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, VOCAB, (STEP_BATCH, STEP_MODEL["block_size"]), generator=g) for _ in range(2))
    losses = []

    def step():
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    step()
    rss = rss_peak_bytes(step)
    allocated = allocator_peak_bytes(step)
    return {"backend": attn, "fused_loss_head": fused_loss_head, "step_peak_bytes": allocated,
            "step_rss_peak_bytes": rss, "loss": losses[-1]}


def step_runs(backends):
    """(backend, fused_loss_head) pairs: each backend as it trains, and a backend with a fused head without it."""
    runs = [(b, True) for b in backends]
    return runs + [(b, False) for b in backends if get_backend(b).loss_head is not None]


def measure_train_step_peaks(backends):
    """The training-step peak (bytes above the step's start) of every step_runs(backends), each in a fresh
    `python -m` process."""
    # one numpy (OpenBLAS) thread: the interpreter's many small matmuls only lose to thread hand-offs
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    results = []
    for attn, fused in step_runs(backends):
        out = subprocess.run([sys.executable, "-m", "bench.test_loss_head", "--one", attn, str(fused)], cwd=root,
                             env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(ON_GPU, reason="on a GPU, test_train_step's rows record the step's peak memory")
def test_train_step_peak_memory_cpu(benchmark, record, timing):
    if not timing:
        pytest.skip("a measurement (minutes on a CPU: the interpreter runs the fused head): runs with --benchmark")
    benchmark.group = "train step peak memory (CPU)"
    results = {(r["backend"], r["fused_loss_head"]): r for r in measure_train_step_peaks(available_backends())}
    logits_and_grad = 2 * STEP_BATCH * STEP_MODEL["block_size"] * VOCAB * 4
    record(kind="train_step_memory", model=STEP_MODEL, batch_size=STEP_BATCH, results=list(results.values()),
           logits_and_grad_bytes=logits_and_grad)
    record_untimed(benchmark, "memory only")
    for backend, fused in results:
        if not fused:  # a backend with a fused head, measured without it: the head must save the logits
            with_head, without = results[backend, True], results[backend, False]
            for key in ("step_peak_bytes", "step_rss_peak_bytes"):
                saved = without[key] - with_head[key]
                assert saved >= logits_and_grad, (f"{backend}'s fused loss head saves {saved / 2**20:.0f} MiB of "
                                                  f"the step's peak ({key}), less than the logits and their "
                                                  f"gradient ({logits_and_grad / 2**20:.0f} MiB)")
            assert abs(with_head["loss"] - without["loss"]) < 1e-3 * without["loss"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(_one_step_peak(sys.argv[2], sys.argv[3:4] != ["False"])))
    else:
        logits_and_grad = 2 * STEP_BATCH * STEP_MODEL["block_size"] * VOCAB * 4
        print(f"training step, {STEP_MODEL}, batch {STEP_BATCH}: peak memory above the step's start "
              f"(logits + their gradient in fp32: {logits_and_grad / 2**20:.0f} MiB)")
        print("  backend           torch allocations   resident set   loss")
        for r in measure_train_step_peaks(sys.argv[1:] or available_backends()):
            name = r["backend"] + ("" if r["fused_loss_head"] else " (logits)")
            print(f"  {name:16s} {r['step_peak_bytes'] / 2**20:12.1f} MiB "
                  f"{r['step_rss_peak_bytes'] / 2**20:10.1f} MiB   {r['loss']:.4f}")
