"""Where and in what precision the model runs: device, dtype, autocast, TF32 and seeds, written once for
training, sampling and the benchmarks.

    rt = setup_runtime(device="auto", dtype="auto", seed=1337)
    with rt.autocast:
        logits, loss = model(x, y)
"""
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanogpt.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str) -> str:
    """'auto' -> cuda, else mps, else cpu; an explicit device is checked to exist here."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here: use --device=cpu")
    if kind == "mps" and not _mps_available():
        raise ConfigError(f"device={device!r} but MPS is not available here: use --device=cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on a CUDA GPU that has it (else float16), float32 elsewhere; an explicit dtype is
    checked against the device."""
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


def check_compile(compile_: bool, device: str) -> None:
    """torch.compile needs a C++ compiler on the CPU and a torch that supports this Python."""
    if not compile_:
        return
    kind = device.split(":")[0]
    if kind == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "clang", "cl")):
        raise ConfigError("compile=True on the CPU needs a C++ compiler (none found on PATH): "
                          "install one or use --compile=False")
    if sys.version_info >= (3, 14):
        if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 9):
            raise ConfigError(f"torch.compile in torch {torch.__version__} does not support Python "
                              f"{sys.version_info.major}.{sys.version_info.minor}: use --compile=False")


def check_runtime(device: str, dtype: str, compile_: bool = False) -> str:
    """Every check of device, dtype and compile, before any work starts; returns the resolved device."""
    device = resolve_device(device)
    resolve_dtype(dtype, device)
    check_compile(compile_, device)
    return device


def autocast_context(device_type: str, dtype: str):
    """Mixed precision for float16/bfloat16; float32 runs as it is."""
    if dtype == "float32":
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=PTDTYPE[dtype])


@dataclass
class Runtime:
    device: str       # "cpu", "cuda", "cuda:1", "mps"
    device_type: str  # "cpu", "cuda", "mps": what torch.amp and fused optimizers want
    dtype: str        # "float32", "bfloat16" or "float16"

    @property
    def autocast(self):
        """A fresh autocast context (a context manager object is reused safely only when not nested)."""
        return autocast_context(self.device_type, self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return PTDTYPE[self.dtype]

    def synchronize(self) -> None:
        """Wait for the device (for timing); a no-op on the CPU."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int | None = None) -> Runtime:
    """Resolve device and dtype, allow TF32 matmuls on CUDA (as nanoGPT), seed torch (CPU and CUDA)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.cuda.set_device(device)  # "cuda:N": later .to("cuda") and kernels use device N
        torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
        torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
    if seed is not None:
        torch.manual_seed(seed)  # seeds every CUDA device too
    return Runtime(device, device_type, dtype)
