"""One optimizer step of the GPT (forward, backward, gradient clipping, AdamW) for attn x compile.

Reported: tokens/s; MFU = (6N + 12*L*H*Q*T) FLOPs per token (nanoGPT's estimate_mfu convention) x tokens/s
/ the device's published dense bf16 peak (GPUs only: None elsewhere); the same FLOP/s as a fraction of the
measured matmul roofline; peak memory (GPU: torch's max allocated; CPU: the process's peak RSS).
"""
import contextlib

import pytest
import torch

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
)
from nanogpt.backends import REFERENCE, available_backends
from nanogpt.hardware import device_peak_flops
from nanogpt.model import GPT, GPTConfig

if ON_GPU:
    MODEL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False)  # GPT-2 124M
    BATCH = 16
else:
    MODEL = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=512, bias=False)
    BATCH = 8


def build(attn, dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL, attn=attn, dropout=0.0)).to(DEVICE)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), DEVICE)
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.amp.autocast(device_type=DEVICE, dtype=dtype))
    return model, optimizer, autocast


def batches(n):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return [(torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["block_size"]), device=DEVICE, generator=g),
             torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["block_size"]), device=DEVICE, generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("attn", available_backends())  # every backend of the registry
def test_train_step(benchmark, record, attn, compile):
    dtype = low_precision_dtype() if ON_GPU else torch.float32
    if interpreted(attn) and compile:
        pytest.skip("Triton interpreted on the CPU: the eager row checks correctness; compiling it adds nothing")
    benchmark.group = "train step"
    model, optimizer, autocast = build(attn, dtype)
    step_model = torch.compile(model) if compile else model

    def step(x, y):
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # correctness gate: the first step's loss and gradients against the reference backend in fp32, same weights
    ref_model, _, _ = build(REFERENCE, torch.float32)
    x, y = batches(1)[0]
    _, ref_loss = ref_model(x, y)
    ref_loss.backward()
    with autocast:
        _, loss = step_model(x, y)
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    ref_grads = dict(ref_model.named_parameters())
    gate(f"train step {attn} compile={compile}",
         [loss.detach().reshape(1)] + [p.grad for _, p in model.named_parameters()],
         [ref_loss.detach().reshape(1)] + [ref_grads[n].grad for n in names], dtype)
    optimizer.zero_grad(set_to_none=True)
    del ref_model

    timed = not interpreted(attn)
    tokens = BATCH * MODEL["block_size"]
    record(kind="train_step", backend=attn, compile=compile, dtype=str(dtype)[6:], timed=timed, model=MODEL,
           batch_size=BATCH, tokens_per_step=tokens)
    if not timed:
        record_untimed(benchmark, "Triton interpreter on CPU: checked, not timed")
        return
    reset_peak_memory()
    seconds = measure(benchmark, step, batches(4), warmup=3, target_round_s=0.0, rounds=10 if ON_GPU else 3)
    if seconds is None:
        return
    flops_per_token = model.flops_per_token()
    achieved = flops_per_token * tokens / seconds
    peak = device_peak_flops(DEVICE)
    roof = benchmark.extra_info.get("roofline_matmul_flops")
    benchmark.extra_info.update({
        "median_s": seconds, "tokens_per_s": tokens / seconds, "model_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None, "peak_flops": peak,
        "roofline_fraction": achieved / roof if roof else None, "peak_memory_bytes": peak_memory_bytes(),
        "mfu_convention": "(6N + 12*L*H*Q*T) FLOPs/token x tokens/s / published dense bf16 peak",
    })
