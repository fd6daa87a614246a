"""nanogpt/runtime.py: device, dtype, autocast, compile checks and seeds, the same for training, sampling and bench."""
from contextlib import nullcontext

import pytest
import torch

from nanogpt.config import ConfigError, TrainConfig, validate_train
from nanogpt.runtime import PTDTYPE, check_runtime, resolve_dtype, setup_runtime


def test_compile_without_a_compiler(monkeypatch):
    import nanogpt.runtime as runtime
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="compile=True on the CPU needs a C\\+\\+ compiler"):
        validate_train(TrainConfig(device="cpu", compile=True))


def test_cpu_defaults_to_float32_without_autocast():
    rt = setup_runtime("cpu", "auto")
    assert (rt.device, rt.device_type, rt.dtype) == ("cpu", "cpu", "float32")
    assert isinstance(rt.autocast, nullcontext) and rt.torch_dtype is torch.float32
    assert resolve_dtype("auto", "cpu") == "float32"


def test_bfloat16_autocast_on_the_cpu():
    rt = setup_runtime("cpu", "bfloat16")
    layer = torch.nn.Linear(4, 4)
    with rt.autocast:
        y = layer(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 == PTDTYPE[rt.dtype]


def test_the_seed_makes_runs_repeatable():
    setup_runtime("cpu", "float32", seed=123)
    a = torch.randn(5)
    setup_runtime("cpu", "float32", seed=123)
    assert torch.equal(a, torch.randn(5))


@pytest.mark.parametrize("device,dtype,message", [
    ("tpu", "auto", "device='tpu' is not a device"),
    ("cpu", "float8", "dtype='float8' is not supported"),
    ("cpu", "float16", "dtype=float16 is not supported on the CPU"),
])
def test_bad_device_or_dtype(device, dtype, message):
    with pytest.raises(ConfigError, match=message):
        check_runtime(device, dtype)
