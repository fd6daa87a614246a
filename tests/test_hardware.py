"""nanogpt/hardware.py: the table of GPU peaks, and MFU that never guesses a peak."""
import pytest

from helpers import TINY_MODEL as TINY
from nanogpt.model import GPT, GPTConfig


def test_estimate_mfu_uses_flop_formula_and_never_guesses_a_peak():
    model = GPT(GPTConfig(**TINY))
    N = model.get_num_params()
    L, H, Q, T = 2, 4, 16, 32
    flops_per_iter = (6 * N + 12 * L * H * Q * T) * T * 8
    assert model.estimate_mfu(8, 0.5, peak_flops=1e12) == pytest.approx(flops_per_iter / 0.5 / 1e12)
    assert model.estimate_mfu(8, 0.5) is None  # CPU: no known peak, so no number


def test_gpu_peak_table():
    from nanogpt.hardware import gpu_peak_flops
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert gpu_peak_flops("Some Future GPU") is None
