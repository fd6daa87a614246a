"""What every kernel module shares: where Triton runs, input checks with clear messages, the launch heuristics and
constants of more than one kernel, and the launch-case helper that `python -m kernels.inspect` compiles from.

A leaf: it imports no other module of the project, so the kernel modules and kernels.inspect both import it at
the top (inspect loads the kernel modules by name; a kernel importing inspect back would close a cycle)."""
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton's short name of each dtype: a pointer argument's signature ("*bf16") and the inspection rows' "dtype"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
               torch.int32: "i32", torch.int64: "i64"}

# fp32 inputs are multiplied in full fp32 ("ieee"), not TF32, so float32 matches the references (attention to 1e-4,
# the loss head to 1e-5); fp16/bf16 dots run on tensor cores whatever this says
PRECISION: tl.constexpr = tl.constexpr("ieee")
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): softmaxes run in base 2


@triton.jit
def tanh(z):
    """tanh in fp32, for GELU's approximation and the logit softcaps (no libdevice call: it runs in the
    interpreter too), as 1 - 2 / (1 + exp(2z)): exact limits +-1 (exp overflows to inf: 1 - 0; underflows to 0:
    1 - 2), an absolute error of a few 1e-7 near 0, where the callers add it to O(1) terms. One exp2, one
    approximate reciprocal, two FMAs: the (1 - e) / (1 + e) form with an IEEE division cost ~10 instructions
    more per element, in the attention softcap per score (sm_90 SASS, `python -m kernels.inspect --loops`)."""
    d = 1.0 + tl.exp2(z * (2.0 * LOG2E))
    return 1.0 - tl.fdiv(tl.full(d.shape, 2.0, tl.float32), d)  # fdiv takes tensors only (the interpreter's)


@triton.jit
def tanh_approx(z):
    """The hardware's tanh: PTX tanh.approx.f32, one MUFU.TANH (sm_75 on), maximum relative error about 2^-11,
    against tanh's exp2 + reciprocal + 2 FMAs. For fp16/bf16 softcaps on a GPU, where rounding the inputs moves
    a score far more; FlashAttention's softcap takes the same instruction (cutlass::fast_tanh). Never under the
    interpreter, which cannot run inline PTX."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True,
                                     pack=1)


# a softcap's SOFTCAP constexpr: off, tanh in fp32 arithmetic (fp32 inputs, the interpreter), the hardware's tanh
SOFTCAP_OFF, SOFTCAP_EXACT = 0, 1
SOFTCAP_FAST: tl.constexpr = tl.constexpr(2)


@triton.jit
def softcap_tanh(z, SOFTCAP: tl.constexpr):
    """The tanh of a softcap (SOFTCAP on, as softcap_mode chose it): the hardware's or the fp32 one."""
    if SOFTCAP == SOFTCAP_FAST:
        return tanh_approx(z)
    else:
        return tanh(z)


# the values of TRITON_INTERPRET that Triton reads as on (its getenv_bool: case-insensitive, no spaces)
_TRUE = ("1", "true", "yes", "on", "y")


def arch_has_tma(arch: str) -> bool:
    """Whether a GPU target ("sm_90", "sm_80") has TMA, the tensor-descriptor loads: Hopper (sm_90) on. The
    launchers decide the same from the device's capability; the inspections of a target ask this."""
    return int(arch.removeprefix("sm_")) >= 90


def arch_of(device) -> str:
    """The architecture family of a CUDA device as the config lists name it: "sm_90" (Hopper and later) or "sm_80"."""
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


def tma_scratch(device):
    """Triton's allocator for the tensor descriptors the kernels build on the device (128 bytes each), on the
    inputs' device: "cuda" would mean the current device, which is not theirs under DDP when the current device
    was never set, nor on a call with tensors on another GPU."""
    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)
    return allocate


def use_tma(*tensors) -> bool:
    """TMA tensor descriptors on Hopper and later, when every base address and row stride is 16-byte aligned
    (the model's (B, T, H, D) views are); the pointer path on older GPUs and under the interpreter."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    ok = all(t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
             for t in tensors)
    if ok:
        # set at every launch: the allocator is a context variable, and autograd runs backward in its own thread
        triton.set_allocator(tma_scratch(t0.device))
    return ok


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter: TRITON_INTERPRET set (before triton is imported) to
    a value Triton reads as on. The one place this is decided: the kernels, kernels.inspect and the configs ask here."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def softcap_mode(softcap: float, dtype: torch.dtype, interpreter: bool | None = None) -> int:
    """The SOFTCAP constexpr of a softcap (0: none) on inputs of `dtype`: the hardware's tanh (SOFTCAP_FAST) for
    fp16/bf16 on a GPU, tanh in fp32 arithmetic for fp32 inputs (which promise fp32 accuracy) and under the
    interpreter (interpreter=None: as interpreting() says)."""
    if not softcap:
        return SOFTCAP_OFF
    if interpreter is None:
        interpreter = interpreting()
    return SOFTCAP_FAST.value if dtype in (torch.float16, torch.bfloat16) and not interpreter else SOFTCAP_EXACT


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
    """q, k, v: 4-d (B, H, T, D) float tensors of one dtype, k and v of one shape (B, H_kv, Tk, D) with q's B and
    D and H_kv dividing H (grouped-query attention: H / H_kv query heads share a kv head). `kv_shape` says in the
    error what k and v must be."""
    for what, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {what} must be a 4-d tensor (B, H, T, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        check_float(name, what, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] == 0 or H % k.shape[1] or k.shape[3] != D:
        raise ValueError(f"{name}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (k and v {kv_shape})")


def check_softcap(name: str, softcap) -> None:
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"{name}: softcap={softcap} must be positive (scores become softcap * tanh(score / "
                         f"softcap)), or None for no cap")


def window_sides(name: str, window, causal: bool = False) -> tuple[int, int]:
    """window=(left, right) as the ops take it: the keys a query sees on each side of its position, ints >= 0,
    -1 or None for an unbounded side; None for no window. Returns (left, right) with -1 for unbounded. causal
    (decoding): the right side must be 0 or unbounded."""
    if window is None:
        return -1, -1
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and \
        all(w is None or (type(w) is int and w >= -1) for w in window)
    if not ok or (causal and window[1] not in (None, -1, 0)):
        right = "right 0, -1 or None (decoding is causal)" if causal else "right likewise"
        raise ValueError(f"{name}: window={window!r} must be (left, right) with left an int >= 0 (or -1 / None: "
                         f"unbounded) and {right}")
    return tuple(-1 if w is None else w for w in window)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast computes matmuls in on this device, or None when autocast is off there. Read in the
    Python wrappers, outside the custom ops, so compiled graphs guard on it."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# ------------------------------------------------------------------------------------------------ launch heuristics


def block_d_of(D: int) -> int:
    """BLOCK_D for head dim D: the next power of two (tl.arange needs one), at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(D))


def warps_for(elements: int) -> int:
    """num_warps for a program holding `elements` elements per tensor: 8 per thread (16-byte accesses in half
    precision), 256 per warp, between 1 and 16 warps."""
    return min(max(elements // 256, 1), 16)


# ------------------------------------------------------------------------------------------------ inspection cases


def launch_case(kernel, fn, config, problem, args):
    """One `python -m kernels.inspect` case (the contract is at the top of kernels/inspect.py) from the arguments a
    launcher passes `fn` (every parameter, by name): torch dtypes stand for tensors, ints and floats for scalars,
    and constexpr parameters take their values; `config` holds the meta-parameters (BLOCK_M, ...) and
    num_warps/num_stages (extra keys, such as a list's own bookkeeping, are ignored unless they name a parameter of
    fn). Integer values are kept, so the inspection specializes them as Triton's JIT does at launch (an integer 1
    becomes a constant, multiples of 16 get the divisibility attribute)."""
    meta = {k: v for k, v in config.items() if k in fn.arg_names}
    args = {**args, **meta}
    missing = [p for p in fn.arg_names if p not in args]
    if missing:
        raise ValueError(f"{kernel}: inspect case lacks argument(s) {', '.join(missing)}")
    signature, constexprs, values = {}, {}, {}
    for param in fn.params:
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.dtype):  # a pointer to it
            signature[param.name] = "*" + DTYPE_NAMES[value]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int) and value == 1 and not param.do_not_specialize:
            signature[param.name] = "constexpr"  # as the JIT compiles an integer 1 (GROUP=1: no GQA loop left)
            constexprs[param.name] = value
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            values[param.name] = value
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel}: cannot describe argument {param.name}={value!r}")
    launch = {k: v for k, v in config.items() if k in meta or k in ("num_warps", "num_stages")}
    return {"kernel": kernel, "fn": fn, "signature": signature, "constexprs": constexprs, "config": launch,
            "problem": dict(problem), "values": values}
