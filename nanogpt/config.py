"""Configuration: dataclass defaults, then a config file, then --key=value overrides, then every check.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is a Python file of plain assignments (as in nanoGPT); values on the command line are
Python literals (strings may go unquoted). Every key must exist and every value must have the default's
type; `validate_*` holds the remaining checks, so that bad input fails in one line before any work starts.
"""
import ast
import difflib
import importlib.util
import math
import os
import sys
import traceback
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

from nanogpt.backends import available_backends, check_backend_name, get_backend
from nanogpt.data import dataset_dir
from nanogpt.errors import ConfigError, UserError
from nanogpt.generate import CONTEXT_MODES
from nanogpt.model import GPTConfig, model_args
from nanogpt.pretrained import HUB_NAMES, check_block_size, is_pretrained_source
from nanogpt.runtime import check_runtime

BACKENDS_HELP = " | ".join(available_backends())
MIN_TEMPERATURE = 1e-6  # logits / temperature stays finite in float32 for |logits| < 3e32
PRETRAINED_HELP = " | ".join(HUB_NAMES) + " | a local HF folder"


def option(default, help):
    """A config key: its default and the help line `--help` prints."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = option("out", "folder for ckpt.pt (and best.pt)")
    eval_interval: int = option(2000, "evaluate train/val loss every this many iterations")
    log_interval: int = option(1, "print a log line every this many iterations")
    eval_iters: int = option(200, "batches per split when estimating the loss")
    eval_only: bool = option(False, "evaluate once and exit")
    always_save_checkpoint: bool = option(True, "save at every evaluation, not only when val loss improves")
    init_from: str = option("scratch", "scratch | resume | " + PRETRAINED_HELP)
    overwrite: bool = option(False, "let a new run (not resume) replace out_dir's checkpoint (moved aside first)")
    # wandb logging
    wandb_log: bool = option(False, "log to Weights & Biases (pip install wandb)")
    wandb_project: str = option("owt", "wandb project")
    wandb_run_name: str = option("gpt2", "wandb run name")
    # data
    dataset: str = option("openwebtext", "folder name under data/ (or $NANOGPT_DATA) with train.bin, val.bin")
    gradient_accumulation_steps: int = option(5 * 8, "micro-steps per optimizer step (whole job, split across ranks)")
    batch_size: int = option(12, "sequences per micro-step and rank")
    block_size: int = option(1024, "context length")
    # model
    n_layer: int = option(12, "transformer blocks")
    n_head: int = option(12, "attention heads")
    n_embd: int = option(768, "embedding width")
    dropout: float = option(0.0, "dropout: 0 for pretraining, 0.1+ for fine-tuning")
    bias: bool = option(False, "bias in Linear and LayerNorm layers")
    attn: str = option("sdpa", "kernel backend (attention, LayerNorm, GELU): " + BACKENDS_HELP)
    fused_loss_head: bool = option(True, "the backend's fused lm_head + cross-entropy where it has one (triton: "
                                         "no logits in memory); False computes the logits as nanoGPT")
    n_kv_head: int = option(0, "key/value heads, dividing n_head (GQA; 1: MQA); 0: one per head (GPT-2)")
    attn_window: int = option(0, "sliding window: a query sees itself and the attn_window - 1 keys before it; "
                                 "0: all")
    attn_softcap: float = option(0.0, "cap attention scores as c * tanh(s / c) (Gemma 2: 50); 0: off")
    logit_softcap: float = option(0.0, "cap the final logits the same way (Gemma 2: 30, modded-nanogpt: 15); 0: off")
    norm: str = option("layer", "normalization: layer (LayerNorm, GPT-2) or rms (RMSNorm: a gain, no bias)")
    rope: bool = option(False, "rotary position embedding of q and k (base 10000) instead of learned positions")
    # AdamW
    learning_rate: float = option(6e-4, "peak learning rate")
    max_iters: int = option(600000, "total optimizer steps")
    weight_decay: float = option(1e-1, "AdamW weight decay (2-D weights only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip gradients at this norm; 0 disables")
    # learning-rate schedule
    decay_lr: bool = option(True, "cosine decay after warmup; False keeps learning_rate")
    warmup_iters: int = option(2000, "linear warmup steps: lr * (it + 1) / (warmup_iters + 1)")
    lr_decay_iters: int = option(600000, "the cosine reaches min_lr here (~ max_iters per Chinchilla)")
    min_lr: float = option(6e-5, "floor of the schedule (~ learning_rate / 10)")
    # system
    backend: str = option("nccl", "DDP backend on CUDA (gloo is always used on the CPU)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16 (auto: bfloat16 where supported, else float32 on CPU)")
    compile: bool = option(False, "torch.compile the model (PyTorch 2)")
    seed: int = option(1337, "random seed (weights, batches, dropout)")
    peak_flops: float = option(0.0, "device peak FLOP/s for MFU; 0 takes it from the table of known GPUs")
    ddp_timeout: int = option(600, "seconds a rank waits in a collective before failing (a dead peer)")


@dataclass
class SampleConfig:
    out_dir: str = option("out", "folder with ckpt.pt (init_from=resume)")
    init_from: str = option("resume", "resume | " + PRETRAINED_HELP)
    start: str = option("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = option(10, "samples, generated as one batch")
    max_new_tokens: int = option(500, "tokens generated per sample")
    temperature: float = option(0.8, "> 0; 1.0 samples the model's distribution, lower is more conservative")
    top_k: int = option(200, "keep only the top_k most likely tokens; 0 disables")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much mass; 1.0 disables")
    seed: int = option(1337, "random seed")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16")
    compile: bool = option(False, "torch.compile the prefill and the one-token decode step (static shapes; on CUDA "
                                  "a CUDA graph, mode=reduce-overhead)")
    attn: str = option("", "kernel backend to sample with, prompt and decoding (" + BACKENDS_HELP + "); empty keeps "
                           "the checkpoint's")
    use_cache: bool = option(True, "KV cache: O(T) work per new token instead of re-running the context")
    context: str = option("slide", "past block_size: slide (exact, re-runs the window every step) | shift (keep "
                                   "the last half, re-run it once, decode from the cache again: fast)")


# ------------------------------------------------------------------------------------------------
# parsing


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key, raw, expected, source):
    """Check that `raw` (already a Python value) fits the type of `key`; return the value to store."""
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(f"{source}: {key}={raw} is not a finite number (give a finite value)")
    if isinstance(raw, int) and not isinstance(raw, bool) and not -2**63 <= raw < 2**63:
        raise ConfigError(f"{source}: {key}={raw} does not fit in 64 bits (give a value below 2**63)")
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
    if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)  # not literals, but meant as numbers: rejected as non-finite, not as a string
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
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r} line {e.lineno}: {e.msg} (a config file holds Python assignments, "
                          f"e.g. batch_size = 12)") from None
    except (OSError, ValueError) as e:  # unreadable, or a NUL byte in the source
        raise ConfigError(f"config file {path!r} cannot be read ({type(e).__name__}: {e}): fix or replace it") from None
    try:
        exec(code, namespace)  # config files are trusted Python, as in nanoGPT
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise ConfigError(f"config file {path!r} line {line} raised {type(e).__name__}: {e} (fix that line)") from None
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
    cfg = cls(**values)
    cfg._explicit = frozenset(values)  # what the user set: a resumed model's shape may only be confirmed by it
    return cfg


def explicit_keys(cfg) -> frozenset:
    """The keys set by a config file or the command line; for a config built in code, those not at their
    default."""
    explicit = getattr(cfg, "_explicit", None)
    if explicit is not None:
        return explicit
    return frozenset(f.name for f in fields(cfg) if f.default is MISSING or getattr(cfg, f.name) != f.default)


def help_text(cls, usage):
    lines = [usage, "", "keys (--key=value; config files set the same keys):"]
    width = max(len(f.name) for f in fields(cls))
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        lines.append(f"  --{f.name:<{width}} = {default!r:<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def cli_config(cls, argv, usage, validate=None):
    """Parse (and validate) for a command line: --help prints the keys, an error prints one line and exits 2."""
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 argument (a surrogate escape) is printed, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, usage))
        sys.exit(0)
    try:
        cfg = parse_args(cls, argv)
        if validate is not None:
            validate(cfg)
    except UserError as e:
        exit_with_error(e)
    return cfg


def exit_with_error(error: UserError):
    """What every command line does with an error the user can fix: one `error:` line, exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------
# checks: everything that can be known to be wrong before any work starts. Each check is written once, where
# its subject lives (the model's shape in GPTConfig, backend names in the registry, GPT-2 names and positions in
# pretrained.py, device and dtype in runtime.py); these functions run them all.


def _positive(cfg, *keys, allow_zero=False):
    for key in keys:
        value = getattr(cfg, key)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def check_model_shape(cfg):
    """The model's own checks (GPTConfig.__post_init__) on a config that carries its keys."""
    GPTConfig(**model_args(cfg))


def check_init_from(init_from, block_size=None, allowed=("scratch", "resume")):
    if init_from in allowed:
        return
    if not init_from.strip():
        raise ConfigError(f"init_from is empty: choose {', '.join(allowed)}, a GPT-2 name or a folder")
    if not is_pretrained_source(init_from):
        raise ConfigError(f"init_from={init_from!r} is neither {', '.join(allowed)}, one of "
                          f"{', '.join(HUB_NAMES)} nor an existing folder")
    if block_size is not None:
        check_block_size(block_size, init_from)


def _machine_memory() -> int:
    """Bytes of host memory, or of the largest GPU if larger (0 where unknown)."""
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = 0
    import torch
    gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return max([host, *gpus])


def check_model_memory(cfg, vocab_size=50304, batch_size=None):
    """Refuse sizes far beyond this machine (4x its memory) before building anything: an absurd n_layer or n_embd
    would otherwise spend minutes allocating, or hang, before running out of memory. A rough count: weights,
    gradients and two AdamW moments in float32, and the activations of one micro-batch."""
    L, C, T = cfg.n_layer, cfg.n_embd, cfg.block_size
    B = batch_size if batch_size is not None else getattr(cfg, "batch_size", 1)
    params = 12 * L * C * C + (vocab_size + T) * C
    need = 16 * params + 4 * B * T * (16 * L * C + vocab_size)
    memory = _machine_memory()
    if memory and need > 4 * memory:
        raise ConfigError(f"n_layer={L}, n_embd={C}, block_size={T}, batch_size={B} need about {need / 2**30:,.0f} "
                          f"GiB, far more than this machine's {memory / 2**30:,.0f} GiB: choose smaller values")


def check_writable_file(path, key):
    """A file the run will write at its end: fail now, not after the work, if it cannot be."""
    folder = os.path.dirname(os.path.abspath(path)) if path else ""
    if not path or os.path.isdir(path):
        raise ConfigError(f"{key}={path!r} is not a file name (e.g. --{key}=trace.json)")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or (os.path.exists(path)
                                                                        and not os.access(path, os.W_OK)):
        raise ConfigError(f"{key}={path!r} cannot be written here (missing folder or no permission): choose a "
                          f"writable place")


def check_out_dir(out_dir):
    if not out_dir.strip():
        raise ConfigError("out_dir is empty: name the folder for checkpoints (e.g. --out_dir=out)")


def check_seed(seed):
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed={seed} must be in [0, 2**63) (e.g. --seed=1337)")


def check_pretrained_options(cfg):
    """GPT-2's weights are a model without the options of today's GPTs: asking for one with them is an error (they
    would be dropped silently, or fail to load)."""
    if cfg.init_from in ("scratch", "resume"):
        return
    defaults = {f.name: f.default for f in fields(GPTConfig)}
    asked = [f"--{k}={getattr(cfg, k)!r}" for k in GPTConfig.OPTIONS
             if hasattr(cfg, k) and getattr(cfg, k) != defaults[k]]
    if asked:
        raise ConfigError(f"init_from={cfg.init_from} loads GPT-2's weights, a model without {' '.join(asked)}: "
                          f"drop these keys, or train with them from init_from=scratch")


def validate_train(cfg: TrainConfig, world_size: int = 1):
    check_out_dir(cfg.out_dir)
    check_seed(cfg.seed)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be in [0, 1) (AdamW's default: --beta1=0.9 "
                              f"--beta2=0.95)")
    _positive(cfg, "eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
              "block_size", "n_layer", "n_head", "n_embd", "learning_rate", "ddp_timeout")
    _positive(cfg, "max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
              "peak_flops", allow_zero=True)
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")
    check_model_shape(cfg)
    check_model_memory(cfg)
    dataset_dir(cfg.dataset)  # a plain folder name under the data root
    check_init_from(cfg.init_from, cfg.block_size)
    check_pretrained_options(cfg)
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                          f"the {world_size} processes: use a multiple of {world_size}")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=True needs the wandb package: pip install wandb (or use --wandb_log=False)")
    device = check_runtime(cfg.device, cfg.dtype, cfg.compile)
    get_backend(cfg.attn).check_device(device)  # what the backend needs (triton: a GPU or the interpreter)


def validate_sample(cfg: SampleConfig):
    if cfg.start == "":
        raise ConfigError("start is empty: give a prompt (--start='ROMEO:') or FILE:path")
    if cfg.start.startswith("FILE:"):
        prompt = cfg.start[5:]
        if not os.path.exists(prompt):
            raise ConfigError(f"start={cfg.start!r}: the prompt file {prompt!r} does not exist")
        if os.path.isdir(prompt):
            raise ConfigError(f"start={cfg.start!r}: {prompt!r} is a folder (give a text file)")
    if cfg.init_from == "resume":
        check_out_dir(cfg.out_dir)
    check_seed(cfg.seed)
    _positive(cfg, "num_samples", "max_new_tokens", "temperature")
    if cfg.temperature < MIN_TEMPERATURE:
        raise ConfigError(f"temperature={cfg.temperature} is below {MIN_TEMPERATURE}: the logits divided by it "
                          f"overflow (use --temperature={MIN_TEMPERATURE} or --top_k=1 for greedy decoding)")
    _positive(cfg, "top_k", allow_zero=True)
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"top_p={cfg.top_p} must be in (0, 1]")
    if cfg.context not in CONTEXT_MODES:
        raise ConfigError(f"context={cfg.context!r}: choose slide (exact, slow past block_size) or shift (fast)")
    if cfg.attn:
        check_backend_name(cfg.attn)
    check_init_from(cfg.init_from, allowed=("resume",))
    check_runtime(cfg.device, cfg.dtype, cfg.compile)
