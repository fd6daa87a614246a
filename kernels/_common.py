"""What every kernel wrapper shares: where Triton can run, and input checks with clear messages."""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, *tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {', '.join(sorted(map(str, devices)))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if interpreting():
            return
        raise RuntimeError(
            f"{name}: the Triton kernels need a CUDA GPU; on the CPU they run only through Triton's interpreter "
            f"(slow, for testing): set TRITON_INTERPRET=1 in the environment before importing triton/kernels, "
            f"or use the 'sdpa' or 'naive' backend")
    raise RuntimeError(f"{name}: Triton kernels do not run on {device.type} tensors: use a CUDA device or the "
                       f"'sdpa' backend")


def check_float(name: str, what: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: {what} has dtype {t.dtype}; supported: float32, float16, bfloat16")


def num_programs_hint(device: torch.device, per_sm: int = 4) -> int:
    """How many persistent programs fill the device: a few per SM on a GPU, a few on the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    return 4


def check_qkv(name: str, q, k, v, kv_shape: str) -> None:
    """q, k, v: 4-d (B, H, T, D) float tensors of one dtype, k and v of one shape with q's B, H and D.
    `kv_shape` says in the error what k and v must be, e.g. "(B, H, Tk, D) with q's B, H and D"."""
    for what, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {what} must be a 4-d tensor (B, H, T, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        check_float(name, what, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"{name}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (k and v {kv_shape})")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast computes matmuls in on this device, or None when autocast is off there. Read in the
    Python wrappers, outside the custom ops, so compiled graphs guard on it."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
