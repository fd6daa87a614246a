"""Configuration: dataclass defaults, then a config file, then --key=value overrides, then every check.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is a Python file of plain assignments (as in nanoGPT); values on the command line are
Python literals (strings may go unquoted). Every key must exist and every value must have the default's
type; `validate_*` holds the remaining checks, so that bad input fails in one line before any work starts.
"""
import ast
import difflib
import importlib.util
import os
import shutil
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields


class ConfigError(ValueError):
    """A bad config key, value or combination; the message names it and says what is accepted."""


def _opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = _opt("out", "folder for ckpt.pt (and best.pt)")
    eval_interval: int = _opt(2000, "evaluate train/val loss every this many iterations")
    log_interval: int = _opt(1, "print a log line every this many iterations")
    eval_iters: int = _opt(200, "batches per split when estimating the loss")
    eval_only: bool = _opt(False, "evaluate once and exit")
    always_save_checkpoint: bool = _opt(True, "save at every evaluation, not only when val loss improves")
    init_from: str = _opt("scratch", "scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF folder")
    # wandb logging
    wandb_log: bool = _opt(False, "log to Weights & Biases (pip install wandb)")
    wandb_project: str = _opt("owt", "wandb project")
    wandb_run_name: str = _opt("gpt2", "wandb run name")
    # data
    dataset: str = _opt("openwebtext", "folder under data/ holding train.bin and val.bin")
    gradient_accumulation_steps: int = _opt(5 * 8, "micro-steps per optimizer step (whole job, split across ranks)")
    batch_size: int = _opt(12, "sequences per micro-step and rank")
    block_size: int = _opt(1024, "context length")
    # model
    n_layer: int = _opt(12, "transformer blocks")
    n_head: int = _opt(12, "attention heads")
    n_embd: int = _opt(768, "embedding width")
    dropout: float = _opt(0.0, "dropout: 0 for pretraining, 0.1+ for fine-tuning")
    bias: bool = _opt(False, "bias in Linear and LayerNorm layers")
    attn: str = _opt("sdpa", "kernel backend: naive | sdpa | triton")
    # AdamW
    learning_rate: float = _opt(6e-4, "peak learning rate")
    max_iters: int = _opt(600000, "total optimizer steps")
    weight_decay: float = _opt(1e-1, "AdamW weight decay (2-D weights only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip gradients at this norm; 0 disables")
    # learning-rate schedule
    decay_lr: bool = _opt(True, "cosine decay after warmup; False keeps learning_rate")
    warmup_iters: int = _opt(2000, "linear warmup steps: lr * (it + 1) / (warmup_iters + 1)")
    lr_decay_iters: int = _opt(600000, "the cosine reaches min_lr here (~ max_iters per Chinchilla)")
    min_lr: float = _opt(6e-5, "floor of the schedule (~ learning_rate / 10)")
    # system
    backend: str = _opt("nccl", "DDP backend on CUDA (gloo is always used on the CPU)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16 (auto: bfloat16 where supported, else float32 on CPU)")
    compile: bool = _opt(False, "torch.compile the model (PyTorch 2)")
    seed: int = _opt(1337, "random seed (weights, batches, dropout)")
    peak_flops: float = _opt(0.0, "device peak FLOP/s for MFU; 0 takes it from the table of known GPUs")
    ddp_timeout: int = _opt(600, "seconds a rank waits in a collective before failing (a dead peer)")


@dataclass
class SampleConfig:
    out_dir: str = _opt("out", "folder with ckpt.pt (init_from=resume)")
    init_from: str = _opt("resume", "resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF folder")
    start: str = _opt("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = _opt(10, "samples, generated as one batch")
    max_new_tokens: int = _opt(500, "tokens generated per sample")
    temperature: float = _opt(0.8, "> 0; 1.0 samples the model's distribution, lower is more conservative")
    top_k: int = _opt(200, "keep only the top_k most likely tokens; 0 disables")
    top_p: float = _opt(1.0, "nucleus sampling: keep the smallest set of tokens with this much mass; 1.0 disables")
    seed: int = _opt(1337, "random seed")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16")
    compile: bool = _opt(False, "torch.compile the prefill and the one-token decode step (static shapes; on CUDA "
                                "a CUDA graph, mode=reduce-overhead)")
    attn: str = _opt("", "kernel backend to sample with (prompt and decoding); empty keeps the checkpoint's")
    use_cache: bool = _opt(True, "KV cache: O(T) work per new token instead of re-running the context")
    context: str = _opt("slide", "past block_size: slide (exact, re-runs the window every step) | shift (keep "
                                 "the last half, re-run it once, decode from the cache again: fast)")


# ------------------------------------------------------------------------------------------------
# parsing


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key, raw, expected, source):
    """Check that `raw` (already a Python value) fits the type of `key`; return the value to store."""
    allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for t in allowed:
        if t is type(None) and raw is None:
            return None
        if t is bool and isinstance(raw, bool):
            return raw
        if t is int and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if t is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if t is str and isinstance(raw, str):
            return raw
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{source}: {key}={raw!r} has type {type(raw).__name__}, but {key} takes {names}")


def _parse_literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # an unquoted string, e.g. --dataset=shakespeare_char


def _unknown_key(key, cls, source):
    close = difflib.get_close_matches(key, [f.name for f in fields(cls)], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}; --help lists every key")


def load_config_file(path, cls):
    """The assignments of a config file, checked against cls's keys and types."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (config files live in config/, e.g. "
                          f"config/train_shakespeare_char.py)")
    namespace = {"__file__": os.path.abspath(path)}
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    exec(code, namespace)  # config files are trusted Python, as in nanoGPT
    known = _field_types(cls)
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, types.ModuleType) or callable(value):
            continue
        if key not in known:
            raise _unknown_key(key, cls, path)
        values[key] = _coerce(key, value, known[key], path)
    return values


def parse_args(cls, argv):
    """cls defaults <- config files (positional) <- --key=value overrides. Raises ConfigError."""
    known = _field_types(cls)
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            values.update(load_config_file(arg, cls))
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"{arg}: expected --key=value (e.g. --{key}=...)")
        if key not in known:
            raise _unknown_key(key, cls, "command line")
        expected = known[key]
        raw = _parse_literal(text)
        if expected is str and not isinstance(raw, str):
            raw = text  # --out_dir=123 or --start=None mean the text itself
        values[key] = _coerce(key, raw, expected, "command line")
    return cls(**values)


def help_text(cls, usage):
    lines = [usage, "", "keys (--key=value; config files set the same keys):"]
    width = max(len(f.name) for f in fields(cls))
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        lines.append(f"  --{f.name:<{width}} = {default!r:<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def cli_config(cls, argv, usage, validate):
    """Parse and validate for a command line: --help prints the keys, an error prints one line and exits 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, usage))
        sys.exit(0)
    try:
        cfg = parse_args(cls, argv)
        validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg


# ------------------------------------------------------------------------------------------------
# checks: everything that can be known to be wrong before any work starts

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here: use --device=cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={device!r} but MPS is not available here: use --device=cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    import torch
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    kind = device.split(":")[0]
    if dtype == "auto":
        if kind == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype == "float16" and kind == "cpu":
        raise ConfigError("dtype=float16 is not supported on the CPU: "
                          "use --dtype=float32 or --dtype=bfloat16")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype=bfloat16 is not supported by {torch.cuda.get_device_name()}: "
                          f"use --dtype=float16")
    return dtype


def check_compile(compile_: bool, device: str):
    if not compile_:
        return
    kind = device.split(":")[0]
    if kind == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "clang", "cl")):
        raise ConfigError("compile=True on the CPU needs a C++ compiler (none found on PATH): "
                          "install one or use --compile=False")
    if sys.version_info >= (3, 14):
        import torch
        if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 9):
            raise ConfigError(f"torch.compile in torch {torch.__version__} does not support Python "
                              f"{sys.version_info.major}.{sys.version_info.minor}: use --compile=False")


def _positive(cfg, *keys, allow_zero=False):
    for key in keys:
        value = getattr(cfg, key)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def validate_train(cfg: TrainConfig, world_size: int = 1):
    from nanogpt.backends import available_backends
    _positive(cfg, "eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
              "block_size", "n_layer", "n_head", "n_embd", "learning_rate", "ddp_timeout")
    _positive(cfg, "max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
              "peak_flops", allow_zero=True)
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: "
                          f"choose n_embd as a multiple of n_head")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")
    if cfg.attn not in available_backends():
        raise ConfigError(f"unknown attention backend attn={cfg.attn!r}: choose one of "
                          f"{', '.join(available_backends())}")
    if cfg.init_from not in ("scratch", "resume") and cfg.init_from not in PRETRAINED_NAMES \
            and not os.path.isdir(cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from!r} is neither scratch, resume, one of "
                          f"{', '.join(PRETRAINED_NAMES)} nor an existing folder")
    if cfg.init_from in PRETRAINED_NAMES and cfg.block_size > 1024:
        raise ConfigError(f"block_size={cfg.block_size} is larger than {cfg.init_from}'s 1024 positions: "
                          f"use --block_size=1024 or less")
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                          f"the {world_size} processes: use a multiple of {world_size}")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=True needs the wandb package: pip install wandb (or use --wandb_log=False)")
    device = resolve_device(cfg.device)
    resolve_dtype(cfg.dtype, device)
    check_compile(cfg.compile, device)
    if cfg.attn == "triton" and device.split(":")[0] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attn=triton on the CPU runs only through Triton's interpreter: set "
                          "TRITON_INTERPRET=1 (slow, for testing), or use a CUDA GPU or --attn=sdpa")


def validate_sample(cfg: SampleConfig):
    from nanogpt.backends import available_backends
    if cfg.start == "":
        raise ConfigError("start is empty: give a prompt (--start='ROMEO:') or FILE:path")
    if cfg.start.startswith("FILE:") and not os.path.isfile(cfg.start[5:]):
        raise ConfigError(f"start={cfg.start!r}: the prompt file {cfg.start[5:]!r} does not exist")
    _positive(cfg, "num_samples", "max_new_tokens", "temperature")
    _positive(cfg, "top_k", allow_zero=True)
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"top_p={cfg.top_p} must be in (0, 1]")
    if cfg.context not in ("slide", "shift"):
        raise ConfigError(f"context={cfg.context!r}: choose slide (exact, slow past block_size) or shift (fast)")
    if cfg.attn and cfg.attn not in available_backends():
        raise ConfigError(f"unknown attention backend attn={cfg.attn!r}: choose one of "
                          f"{', '.join(available_backends())}")
    if cfg.init_from != "resume" and cfg.init_from not in PRETRAINED_NAMES and not os.path.isdir(cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from!r} is neither resume, one of {', '.join(PRETRAINED_NAMES)} "
                          f"nor an existing folder")
    device = resolve_device(cfg.device)
    resolve_dtype(cfg.dtype, device)
    check_compile(cfg.compile, device)
