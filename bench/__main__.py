"""One training configuration, timed: nanoGPT's bench.py on the project's --key=value config system.

    python -m bench --n_layer=12 --batch_size=12 --attn=triton --compile=True
    python -m bench --device=cpu --n_layer=2 --n_embd=128 --n_head=4 --block_size=64 --batch_size=8
    python -m bench ... --profile=True      # also writes a torch.profiler trace (chrome://tracing, Perfetto)

Prints ms/iter, tokens/s and MFU (nanoGPT's estimate_mfu convention; n/a where the device's peak is unknown).
"""
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from nanogpt.backends import get_backend
from nanogpt.config import (
    ConfigError,
    TrainConfig,
    check_model_memory,
    check_model_shape,
    check_seed,
    check_writable_file,
    cli_config,
    exit_with_error,
    option,
)
from nanogpt.data import BatchLoader, dataset_dir
from nanogpt.errors import UserError, out_of_memory
from nanogpt.model import GPT, GPTConfig, model_args
from nanogpt.runtime import check_runtime, setup_runtime


def _as_in_train(name):
    """The same default and help as train.py's key of that name."""
    f = TrainConfig.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


@dataclass
class BenchConfig:
    batch_size: int = _as_in_train("batch_size")
    block_size: int = _as_in_train("block_size")
    n_layer: int = _as_in_train("n_layer")
    n_head: int = _as_in_train("n_head")
    n_embd: int = _as_in_train("n_embd")
    vocab_size: int = option(50304, "vocabulary (of the random tokens)")
    dropout: float = _as_in_train("dropout")
    bias: bool = _as_in_train("bias")
    attn: str = _as_in_train("attn")
    fused_loss_head: bool = _as_in_train("fused_loss_head")
    real_data: bool = option(False, "read batches from data/<dataset> instead of random tokens")
    dataset: str = _as_in_train("dataset")
    device: str = _as_in_train("device")
    dtype: str = _as_in_train("dtype")
    compile: bool = option(False, "torch.compile the model (compile time is not timed)")
    seed: int = _as_in_train("seed")
    warmup_steps: int = option(10, "untimed steps first (compile, autotuning, allocator warm-up)")
    num_steps: int = option(20, "timed steps")
    profile: bool = option(False, "write a torch.profiler chrome trace of a few steps")
    profile_file: str = option("bench_trace.json", "where the trace goes")
    peak_flops: float = _as_in_train("peak_flops")


def validate(cfg):
    for key in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_size", "num_steps"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be > 0")
    if cfg.warmup_steps < 0 or cfg.peak_flops < 0:
        raise ConfigError(f"warmup_steps={cfg.warmup_steps} and peak_flops={cfg.peak_flops} must be >= 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")
    check_seed(cfg.seed)
    check_model_shape(cfg)
    check_model_memory(cfg, cfg.vocab_size)
    if cfg.profile:
        check_writable_file(cfg.profile_file, "profile_file")
    if cfg.real_data:
        dataset_dir(cfg.dataset)
    device = check_runtime(cfg.device, cfg.dtype, cfg.compile)
    get_backend(cfg.attn).check_device(device)


def main(argv):
    cfg = cli_config(BenchConfig, argv, "usage: python -m bench [config_file.py] [--key=value ...]", validate)
    try:
        return run(cfg)
    except UserError as e:  # e.g. --real_data=True on a dataset that is not prepared: one line, exit 2
        exit_with_error(e)
    except (MemoryError, RuntimeError) as e:  # a model or batch too large for this machine: one line too
        exit_with_error(out_of_memory(e))


def run(cfg):
    rt = setup_runtime(cfg.device, cfg.dtype, seed=cfg.seed)
    device, device_type, dtype = rt.device, rt.device_type, rt.dtype
    autocast = rt.autocast

    if cfg.real_data:
        loader = BatchLoader(dataset_dir(cfg.dataset), cfg.block_size, cfg.batch_size, device, seed=cfg.seed)
        get_batch = lambda: next(loader.train_step(1))  # noqa: E731
    else:
        x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
        y = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
        get_batch = lambda: (x, y)  # noqa: E731

    model = GPT(GPTConfig(**model_args(cfg))).to(device)
    optimizer = model.configure_optimizers(1e-2, 1e-4, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if cfg.compile else model

    def step():
        X, Y = get_batch()
        with autocast:
            _, loss = step_model(X, Y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = rt.synchronize

    print(f"{model.get_num_params() / 1e6:.2f}M parameters, attn={cfg.attn}, compile={cfg.compile}, {device}, {dtype}")
    for _ in range(cfg.warmup_steps):
        step()
    sync()
    t0 = time.perf_counter()
    for k in range(cfg.num_steps):
        loss = step()
    lossf = loss.item()  # syncs
    sync()
    dt = (time.perf_counter() - t0) / cfg.num_steps
    tokens = cfg.batch_size * cfg.block_size
    mfu = model.estimate_mfu(cfg.batch_size, dt, peak_flops=cfg.peak_flops or None)
    mfu_text = f"{mfu * 100:.2f}%" if mfu is not None else "n/a (unknown device peak: set --peak_flops)"
    print(f"loss {lossf:.4f}, time per iteration: {dt * 1000:.2f}ms, {tokens / dt:,.0f} tokens/s, MFU: {mfu_text}")

    if cfg.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(3):
                step()
            sync()
        try:
            prof.export_chrome_trace(cfg.profile_file)
        except OSError as e:
            raise ConfigError(f"could not write the profiler trace {cfg.profile_file}: {e.strerror} (choose a "
                              f"writable --profile_file)") from None
        if not os.path.isfile(cfg.profile_file):  # some torch versions log the failure instead of raising
            raise ConfigError(f"the profiler trace {cfg.profile_file} was not written (choose a writable "
                              f"--profile_file)")
        print(f"wrote profiler trace to {cfg.profile_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
